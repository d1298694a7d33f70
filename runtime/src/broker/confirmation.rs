//! The broker's word on one published message, apart from the publish itself: a sender that
//! does not wait for it before its next message keeps its messages flowing while the broker
//! confirms them, in order, behind them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::Result;

/// Resolves `Ok` once the broker has taken the message (RabbitMQ's publisher confirm, Redis's
/// reply to the push), or with why it did not (a nack, a lost channel or connection).
///
/// Await it: on RabbitMQ a confirmation dropped unawaited is kept by lapin until its channel
/// closes.
#[must_use = "a confirmation not awaited hides a message the broker may have refused"]
pub struct Confirmation(Pin<Box<dyn Future<Output = Result<()>> + Send>>);

impl Confirmation {
    /// The confirmation `answer` resolves to.
    pub fn of(answer: impl Future<Output = Result<()>> + Send + 'static) -> Self {
        Self(Box::pin(answer))
    }

    /// A confirmation already in hand: the broker answered the publish itself.
    pub fn taken() -> Self {
        Self::of(std::future::ready(Ok(())))
    }
}

impl Future for Confirmation {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Result<()>> {
        self.0.as_mut().poll(context)
    }
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmation")
    }
}
