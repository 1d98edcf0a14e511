//! Bodies over h2 streams, for both sides of the proxy: [`Recv`] reads a stream's DATA and
//! trailers as an HTTP body, giving flow-control capacity back as each frame is taken, and
//! [`Send`] pipes any HTTP body into a stream under the peer's flow control, ending it with
//! trailers or END_STREAM, and stops (the caller resets) when the peer resets the stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body, Frame, SizeHint};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Data,
    Trailers,
    Done,
}

/// A received h2 stream as an HTTP body: DATA frames (capacity released as they are read),
/// then trailers.
#[derive(Debug)]
pub struct Recv {
    stream: RecvStream,
    part: Part,
}

impl Recv {
    pub fn new(stream: RecvStream) -> Recv {
        Recv {
            stream,
            part: Part::Data,
        }
    }
}

impl Body for Recv {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.part == Part::Data {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.part = Part::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.part = Part::Trailers,
            }
        }
        if this.part == Part::Trailers {
            let polled = ready!(this.stream.poll_trailers(cx));
            this.part = Part::Done;
            return Poll::Ready(match polled {
                Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            });
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        // h2 says end of stream only when nothing, trailers included, is left to read.
        self.part == Part::Done || self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// Pipes `body` into `stream`; resolves once the stream has been ended (Ok), or with the
/// reason to reset it: `CANCEL` when the body failed or the stream could not take it, or the
/// peer's own reason when it reset the stream (sending a reset then is harmless).
pub struct Send<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// Data taken from the body, waiting for flow-control capacity.
    pending: Bytes,
    /// `pending` is the body's last frame.
    last: bool,
}

impl<B> Send<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    pub fn new(body: B, stream: SendStream<Bytes>) -> Send<B> {
        Send {
            body,
            stream,
            pending: Bytes::new(),
            last: false,
        }
    }

    /// The stream, to reset it when the pipe failed.
    pub fn stream(&mut self) -> &mut SendStream<Bytes> {
        &mut self.stream
    }

    /// Nothing more can be sent while the peer withholds capacity or the body has nothing
    /// ready: a reset by the peer ends the pipe.
    fn reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Reason>> {
        match self.stream.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(reason)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Reason::CANCEL)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<B> Future for Send<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Output = Result<(), Reason>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Reason>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                this.stream.reserve_capacity(this.pending.len());
                let granted = match this.stream.poll_capacity(cx) {
                    Poll::Pending => return this.reset(cx),
                    Poll::Ready(Some(Ok(n))) => n,
                    Poll::Ready(_) => return Poll::Ready(Err(Reason::CANCEL)),
                };
                if granted == 0 {
                    continue;
                }
                let chunk = this.pending.split_to(granted.min(this.pending.len()));
                let end = this.last && this.pending.is_empty();
                this.stream
                    .send_data(chunk, end)
                    .map_err(|_| Reason::CANCEL)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return this.reset(cx),
                Poll::Ready(None) => {
                    return Poll::Ready(
                        this.stream
                            .send_data(Bytes::new(), true)
                            .map_err(|_| Reason::CANCEL),
                    )
                }
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Err(Reason::CANCEL)),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    this.last = this.body.is_end_stream();
                    if data.is_empty() {
                        if this.last {
                            return Poll::Ready(
                                this.stream
                                    .send_data(data, true)
                                    .map_err(|_| Reason::CANCEL),
                            );
                        }
                        continue;
                    }
                    this.pending = data;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Poll::Ready(
                            this.stream
                                .send_trailers(trailers)
                                .map_err(|_| Reason::CANCEL),
                        );
                    }
                }
            }
        }
    }
}
