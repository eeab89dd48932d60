//! The account view of the contract: what `/v1` answers about an account, and the body of every
//! outbound webhook. The store keeps its own
//! row type, so a field renamed here changes the API, never how snapshots are written.

use chrono::{DateTime, Utc};
use domain::{AccountSnapshot, AccountStatus, Resource};
use serde::Serialize;
use uuid::Uuid;

/// The account view (`GET /v1/accounts/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AccountView {
    pub account_id: Uuid,
    pub user_id: Uuid,
    pub status: Status,
    /// The resource's `connection.status` as Argyle sent it (`connecting`, `connected`, `error`, ...).
    pub connection_status: Option<String>,
    /// The newest account object Argyle sent, exactly as sent.
    #[schema(value_type = Option<Object>)]
    pub resource: Option<Resource>,
    pub resource_updated_at: Option<DateTime<Utc>>,
    /// Distinct events folded into this view.
    #[schema(minimum = 1)]
    pub version: i64,
    /// Log position of the last folded event.
    #[schema(minimum = 1)]
    pub last_position: i64,
    pub last_event: String,
    pub first_seen_at: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
}

/// Whether the account still exists at Argyle, or its personal data was erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = AccountStatus)]
pub enum Status {
    Active,
    Removed,
    Erased,
}

impl From<AccountStatus> for Status {
    fn from(status: AccountStatus) -> Self {
        match status {
            AccountStatus::Active => Self::Active,
            AccountStatus::Removed => Self::Removed,
            AccountStatus::Erased => Self::Erased,
        }
    }
}

impl From<&AccountSnapshot> for AccountView {
    fn from(snapshot: &AccountSnapshot) -> Self {
        Self {
            account_id: snapshot.account_id,
            user_id: snapshot.user_id,
            status: snapshot.status.into(),
            connection_status: snapshot.connection_status.clone(),
            resource: snapshot.resource.clone(),
            resource_updated_at: snapshot.resource_updated_at(),
            version: snapshot.version,
            last_position: snapshot.last_position,
            last_event: snapshot.last_event.clone(),
            first_seen_at: snapshot.first_seen_at,
            last_event_at: snapshot.last_event_at,
            removed_at: snapshot.removed_at,
        }
    }
}
