//! The pure core of account-projector: what an Argyle webhook says and what it does to an account.
//!
//! # Layout
//! - [`envelope`]: parsing a webhook body into an [`Envelope`] and classifying its [`EventKind`].
//! - [`resource`]: the account object, kept as raw JSON plus the two facts the fold compares.
//! - [`snapshot`]: the [`AccountSnapshot`] that the projector keeps per account, [`step`], the one
//!   fold step every reader of the log takes (parse the stored body, [`apply`] it, a refusal or a
//!   panic a [`FoldError`]).
//!
//! Nothing here does IO, reads a clock or knows HTTP: every time comes from the event log. The
//! projector, the rebuild, time travel, history and the tests all call the same [`step`], so they
//! cannot disagree. Which events are folded is [`EventKind::is_folded`]; the store's SQL filter is
//! tied to it by a test.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod resource;
pub mod snapshot;

pub use envelope::{
    ACCOUNT_ERASED, ACCOUNT_FETCHED, ACCOUNT_GONE, ACCOUNT_NOT_FOUND, Envelope, EnvelopeError,
    EventKind,
};
pub use resource::Resource;
pub use snapshot::{
    AccountSnapshot, AccountStatus, FoldError, LoggedEvent, Origin, RawBody, RawEvent, apply,
    resource_changed, step,
};
