//! The pure core of account-projector: what an Argyle webhook says and what it does to an account.
//!
//! # Layout
//! - [`envelope`]: parsing a webhook body into an [`Envelope`] (unknown fields are kept in its payload)
//!   and classifying its [`EventKind`].
//! - [`snapshot`]: the [`AccountSnapshot`] that the projector keeps per account, the [`apply`] fold
//!   that turns one logged event into the next snapshot, and the [`AccountView`] the API serves.
//!
//! Nothing here does IO or reads a clock: every time comes from the event log. The projector, the
//! rebuild, time travel and the tests all call the same [`apply`], so they cannot disagree.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod snapshot;

pub use envelope::{Envelope, EnvelopeError, EventKind};
pub use snapshot::{
    AccountSnapshot, AccountStatus, AccountView, FoldError, LoggedEvent, apply, fold,
};
