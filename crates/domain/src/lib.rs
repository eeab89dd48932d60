//! The pure core of account-projector: what an Argyle webhook says and what it does to an account.
//!
//! # Layout
//! - [`envelope`]: parsing a webhook body into an [`Envelope`] and classifying its [`EventKind`].
//! - [`resource`]: the account object, kept as raw JSON plus the two facts the fold compares.
//! - [`snapshot`]: the [`AccountSnapshot`] that the projector keeps per account, the [`apply`] fold
//!   that turns one logged event into the next snapshot, and the [`AccountView`] the API serves.
//!
//! Nothing here does IO or reads a clock: every time comes from the event log. The projector, the
//! rebuild, time travel and the tests all call the same [`apply`], so they cannot disagree.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod resource;
pub mod snapshot;

pub use envelope::{ACCOUNT_FETCHED, ACCOUNT_NOT_FOUND, Envelope, EnvelopeError, EventKind};
pub use resource::Resource;
pub use snapshot::{
    AccountSnapshot, AccountStatus, AccountView, FoldError, LoggedEvent, Origin, RawEvent, apply,
    fold, step,
};
