"""The colocated role: one engine prefills and decodes (the baseline PD is compared with)."""

from __future__ import annotations

from fdpd.engine.engine import RequestError, StepOutput
from fdpd.pd.protocol import Abort, Submit, SubmitAck
from fdpd.pd.service import InstanceService, Stream
from fdpd.pd.transport import Inbound


class MixedService(InstanceService):
    role = "mixed"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[Submit] = self.on_submit

    def on_submit(self, inbound: Inbound) -> None:
        msg: Submit = inbound.msg
        if self.refuses_submit(msg, len(self.engine.scheduler.waiting), "requests waiting"):
            return
        try:
            req = self.build_request(msg)
            req.arrival_time = inbound.received_at or req.arrival_time   # off the socket
            self.engine.scheduler.add(req)
        except (RequestError, ValueError) as e:
            self.reject(msg.reply_to, msg.req_id, str(e), retryable=False)
            return
        self.streams[msg.req_id] = Stream(msg.reply_to, req, req.arrival_time)
        self.send(msg.reply_to, SubmitAck(msg.req_id))

    def on_step(self, outputs: list[StepOutput]) -> None:
        self.stream_outputs(outputs)

    def finish_timeline(self, s: Stream, now: float) -> dict:
        req = s.req
        scheduled = req.scheduled_at or s.first_token_at
        paused = req.paused_seconds()
        phases = {"prefill_queue": max(0.0, scheduled - req.arrival_time),
                  "prefill": max(0.0, s.first_token_at - scheduled - s.paused_before_first),
                  "decode": max(0.0, now - s.first_token_at - (paused - s.paused_before_first)),
                  **self.pause_phases(req)}
        self.metrics.observe_phases(phases)
        return {"phases": phases, "decode_instance": self.instance_id,
                "num_preemptions": req.num_preemptions}

    def on_abort(self, inbound: Inbound) -> None:
        msg: Abort = inbound.msg
        self.submits.add(msg.req_id)        # a Submit it overtook must not start the request
        self.engine.abort_request(msg.req_id)
        self.forget_stream(msg.req_id)
