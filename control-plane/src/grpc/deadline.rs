//! Deadlines: a call that carries `grpc-timeout` (how a gRPC client sends
//! its deadline: grpc-go's and grpcurl's `-max-time`, tonic's
//! `Request::set_timeout`) ends with `DEADLINE_EXCEEDED` once it has run
//! that long, whether it is still being handled or is a stream still
//! sending. The handler is dropped then, and with it whatever it waited
//! on; a write already handed to the store still lands, as with any call a
//! client gives up on (the answer a client heard was never an OK).
//!
//! The time counts from when the call's headers arrived. A malformed
//! value is refused with `INVALID_ARGUMENT` naming the header and its
//! form, rather than taken as "no deadline".
//!
//! Agents' streams (AgentService.Connect) are served by the connection's
//! own task and never pass here: an agent's stream is meant to last.

use bytes::Bytes;
use http_body::Frame;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap};

const HEADER: &str = "grpc-timeout";

/// Wraps the routes so that every call honours its `grpc-timeout`.
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = match parse(request.headers()) {
            Ok(None) => return Box::pin(self.inner.call(request)),
            Ok(Some(timeout)) => timeout,
            Err(refusal) => return Box::pin(std::future::ready(Ok(refusal.into_http()))),
        };
        let deadline = far_enough(timeout);
        let response = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, response).await {
                Err(_elapsed) => Ok(expired(timeout).into_http()),
                Ok(Err(error)) => Err(error),
                Ok(Ok(response)) => Ok(response.map(|body| {
                    Body::new(DeadlineBody {
                        body,
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        timeout,
                        done: false,
                    })
                })),
            }
        })
    }
}

/// `now + timeout`, or a time far enough off for a timeout too long to
/// add (up to 99,999,999 hours can be asked for).
fn far_enough(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn expired(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the call's deadline (grpc-timeout {timeout:?}) passed before it finished"
    ))
}

/// The call's `grpc-timeout`: up to 8 ASCII digits and a unit, `H` hours,
/// `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds or `n`
/// nanoseconds (the gRPC over HTTP/2 protocol's `Timeout`).
fn parse(headers: &HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let refuse = || {
        Status::invalid_argument(format!(
            "{HEADER}: must be 1 to 8 digits followed by a unit (H, M, S, m, u or n), got {:?}",
            String::from_utf8_lossy(value.as_bytes())
        ))
    };
    let raw = value.as_bytes();
    let Some((&unit, digits)) = raw.split_last() else {
        return Err(refuse());
    };
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(refuse());
    }
    let amount: u64 = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(refuse)?;
    let timeout = match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return Err(refuse()),
    };
    Ok(Some(timeout))
}

/// A response body (a server stream's messages) that ends with
/// `DEADLINE_EXCEEDED` trailers when the deadline passes first.
struct DeadlineBody {
    body: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    done: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            if !matches!(&frame, Some(Ok(f)) if f.is_data()) {
                this.done = true;
            }
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.done = true;
        let mut trailers = HeaderMap::new();
        // Only a message that is not valid header text could fail here.
        let _ = expired(this.timeout).add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tower::{Layer, Service};

    /// A stream's body: the frames sent on `rx`, as a handler yields them.
    struct Frames(mpsc::Receiver<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.get_mut().0.poll_recv(cx).map(|frame| frame.map(Ok))
        }
    }

    async fn next_frame(body: &mut Body) -> Option<Frame<Bytes>> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx))
            .await
            .map(|frame| frame.unwrap())
    }

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::new(());
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert(HEADER, http::HeaderValue::from_str(timeout).unwrap());
        }
        request
    }

    fn code(response: &http::Response<Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn every_unit_of_the_protocol_is_read() {
        let read = |v: &str| parse(request(Some(v)).headers());
        assert_eq!(read("2H").unwrap(), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M").unwrap(), Some(Duration::from_secs(180)));
        assert_eq!(read("10S").unwrap(), Some(Duration::from_secs(10)));
        assert_eq!(read("250m").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(
            read("99999999u").unwrap(),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(read("5n").unwrap(), Some(Duration::from_nanos(5)));
        assert_eq!(parse(request(None).headers()).unwrap(), None);
        for bad in ["", "m", "10", "10s", "123456789m", "-1S", "1.5S", "10 S"] {
            let refusal = read(bad).unwrap_err();
            assert_eq!(refusal.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(
                refusal.message().starts_with("grpc-timeout: must be"),
                "{bad:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_still_being_handled_at_its_deadline_is_answered_deadline_exceeded() {
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
        });
        let mut service = DeadlineLayer.layer(never);
        let started = Instant::now();
        let response = service.call(request(Some("300m"))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(code(&response).as_deref(), Some("4"));
        let message = response.headers().get("grpc-message").unwrap();
        assert!(message.to_str().unwrap().contains("grpc-timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_still_sending_at_its_deadline_ends_with_deadline_exceeded_trailers() {
        let (tx, rx) = mpsc::channel(4);
        let body = std::sync::Mutex::new(Some(rx));
        let streaming = tower::service_fn(move |_: http::Request<()>| {
            let body = Body::new(Frames(body.lock().unwrap().take().unwrap()));
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(body)))
        });
        let mut service = DeadlineLayer.layer(streaming);
        let response = service.call(request(Some("1S"))).await.unwrap();
        assert_eq!(code(&response), None, "the stream started fine");
        tx.send(Frame::data(Bytes::from_static(b"first")))
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = next_frame(&mut body).await.unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first"));
        let started = Instant::now();
        let last = next_frame(&mut body).await.unwrap();
        let trailers = last.into_trailers().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "4");
        assert_eq!(started.elapsed(), Duration::from_secs(1), "at the deadline");
        assert!(
            next_frame(&mut body).await.is_none(),
            "nothing after the trailers"
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_a_deadline_is_left_alone() {
        let answer = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut service = DeadlineLayer.layer(answer);
        let started = Instant::now();
        let response = service.call(request(None)).await.unwrap();
        assert_eq!(code(&response), None);
        assert_eq!(started.elapsed(), Duration::from_secs(3600));
    }
}
