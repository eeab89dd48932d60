//! The HTTP pieces every role of account-projector mounts, whatever it serves.
//!
//! # Layout
//! - [`problem`]: [`Problem`], the RFC 9457 error every route answers with, and the 404/405
//!   fallbacks.
//! - [`health`]: `/healthz`, `/readyz` and the [`Readiness`] state they answer from.
//! - [`middleware`]: [`middleware::finish`] puts the fallbacks, the request span, the time limit
//!   and request ids around a router.
//! - [`batch`]: [`Batcher`], requests that arrive while a batch runs share the next (the group
//!   committer and the shared snapshot reader).
//! - [`view`]: [`AccountView`], what `/v1` says about an account and what outbound webhooks carry.
//! - [`wait`]: `?wait=`, how long a request asks to be held open.

#![forbid(unsafe_code)]

pub mod batch;
pub mod health;
pub mod middleware;
pub mod problem;
pub mod view;
pub mod wait;

pub use batch::{Abandoned, Batcher};
pub use health::{HealthDoc, Readiness};
pub use problem::Problem;
pub use view::AccountView;
