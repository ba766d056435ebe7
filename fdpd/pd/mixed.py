"""The colocated role: one engine prefills and decodes (the baseline PD is compared with)."""

from __future__ import annotations

from fdpd.engine.engine import RequestError, StepOutput
from fdpd.pd.protocol import Abort, Submit, SubmitAck
from fdpd.pd.service import InstanceService
from fdpd.pd.transport import Inbound


class MixedService(InstanceService):
    role = "mixed"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers[Submit] = self.on_submit
        self.routes: dict[str, str] = {}          # req_id -> router inbox

    def on_submit(self, inbound: Inbound) -> None:
        msg: Submit = inbound.msg
        try:
            req = self.build_request(msg)
            self.engine.scheduler.add(req)
        except (RequestError, ValueError) as e:
            self.reject(msg.reply_to, msg.req_id, str(e), retryable=False)
            return
        self.routes[msg.req_id] = msg.reply_to
        self.send(msg.reply_to, SubmitAck(msg.req_id))

    def on_step(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            self.send(route, self.tokens_message(out))
            if out.finished:
                del self.routes[out.request_id]

    def on_abort(self, inbound: Inbound) -> None:
        msg: Abort = inbound.msg
        self.engine.abort_request(msg.req_id)
        self.routes.pop(msg.req_id, None)
