"""`PdConnector`: pdserve's vLLM KV connector (`KVConnectorBase_V1`), loaded by module path.

vLLM builds one instance per role in two processes of an engine:
- the scheduler role (engine core process) wraps a `TransferPlanner` (pure bookkeeping);
- the worker role (model runner process) wraps a `KVWorker`: the paged KV tensors, a `Sender` on prefill
  engines and a `Receiver` on decode engines.
The planner's `StepPlan` travels to the worker inside each step's scheduler output.

Settings come from `kv_connector_extra_config` (`kv_transfer.config.ConnectorSettings`: an unknown key is an
error); the cluster secret from the environment
(`PDSERVE_KV_SECRET`, hex), never from a config file. The actor that owns the engine reaches the worker role
through `kv_transfer.control` (vLLM's worker extension): the receive address, state, releases, link probes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kv_transfer import nccl_transport, shm, tcp
from kv_transfer.address import TCP, KVAddress, NoRoute, route, tcp_hosts
from kv_transfer.config import ConnectorSettings
from kv_transfer.dial import Dialer
from kv_transfer.endpoint import Endpoint
from kv_transfer.link import Listener
from kv_transfer.nccl import NcclConfig
from kv_transfer.nccl_transport import NcclPlane
from kv_transfer.params import Spec, block_runs, from_params
from kv_transfer.planner import Scheduled, StepPlan, TransferPlanner
from kv_transfer.receiver import Receiver
from kv_transfer.sender import Dial, Outgoing, Sender
from kv_transfer.transport import SECRET_ENV, Transport, TransportConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# The worker process's Python switch interval, in seconds, once its KV threads run (Python's default is 5 ms).
# The sender and reader threads spend their time in socket calls that release the interpreter, and must take it
# back after each one, several times per layer. While another thread of the process runs Python (the model
# runner between its ops, vLLM's own threads), each such hand-back waits up to the switch interval. A 512-token
# prompt's KV as 30 messages over the tcp transport, with a busy Python thread in each process, moved at 0.11x
# raw loopback TCP at 5 ms and 0.37x at 0.2 ms; without the busy threads, at 1.2-1.3x raw either way
# (docs/benchmarks/transport.md). A thread that holds the interpreter alone is never interrupted, so the short
# interval costs only while threads contend.
SWITCH_INTERVAL_S = 0.0002


def transport_config(s: ConnectorSettings) -> TransportConfig:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise RuntimeError(f"{SECRET_ENV} is not set: KV links need the cluster secret")
    return TransportConfig(
        endpoint=Endpoint(s.instance_id, s.epoch),
        secret=bytes.fromhex(secret),
        stall_timeout_s=s.transfer.stall_timeout_s,
        max_stash_bytes=s.transfer.receive_buffer_mib << 20,
    )


def local_addresses() -> list[str]:
    """Every address of this node's interfaces (its network namespace's)."""
    import psutil  # a dependency of vLLM's

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)]


def listen(s: ConnectorSettings, config: TransportConfig, plane: NcclPlane | None) -> Receiver:
    """The decode worker's listeners, one per route its transport offers, and the address that names them all
    (`plane`: the worker's NCCL side, for transport "nccl": its control links come in over tcp)."""
    listeners: list[Listener[Any]] = []
    shm_name, tcp_address = None, None
    try:
        if s.transfer.transport in ("auto", "shm"):
            listeners.append(shm.listen(config))
            shm_name = listeners[-1].address
        if s.transfer.transport in ("auto", "tcp", "nccl"):
            bind, advertise = tcp_hosts(s.transfer, s.node_ip, local_addresses())
            if plane is not None:
                listeners.append(nccl_transport.listen(config, plane, host=bind, port=s.transfer.kv_port))
            else:
                listeners.append(tcp.listen(config, host=bind, port=s.transfer.kv_port))
            tcp_address = (advertise, listeners[-1].address[1])
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    address = KVAddress(s.node_id, shm_name, tcp_address)
    log.info("%s: KV listener at %s", s.instance_id, address)
    return Receiver(listeners, str(address), s.transfer.lease_s)


def nccl_plane(s: ConnectorSettings) -> NcclPlane | None:
    """The worker's NCCL side when the transport is "nccl" (a config error on an engine without a GPU)."""
    s.transfer.check_engine(gpu=torch.cuda.is_available())
    if s.transfer.transport != "nccl":
        return None
    from kv_transfer.cupy_comm import CupyBackend  # cupy only where it is used

    return NcclPlane(NcclConfig(Endpoint(s.instance_id, s.epoch)), CupyBackend(torch.cuda.current_device()))


def nccl_dialer(config: TransportConfig, plane: NcclPlane, local_node: str) -> Dial:
    """Dials a decode worker's control link (its tcp route) for the nccl transport."""

    def dial(address: str, timeout: float) -> Transport:
        try:
            kind, target = route(address, local_node)
        except ValueError as e:
            raise NoRoute(str(e)) from e
        if kind != TCP or not isinstance(target, tuple):
            raise NoRoute(f"the nccl transport needs the decode worker's tcp route, {address!r} offers none")
        return nccl_transport.connect(target, config, plane, timeout)

    return dial


RECORD_KINDS = ("dial", "sent", "recv")


@dataclass
class PdMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class PdTransferStats(KVConnectorStats):
    """Per-transfer records from the worker role, lists of dicts by kind: "dial" (prefill: whether the transfer's link
    came up, reported at its first layer), "sent" (prefill: the transfer done) and "recv" (decode)."""

    def reset(self) -> None:
        self.data = {kind: [] for kind in RECORD_KINDS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for kind in RECORD_KINDS:
            self.data.setdefault(kind, []).extend(other.data.get(kind, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        return {kind: len(self.data.get(kind, [])) for kind in RECORD_KINDS}

    def is_empty(self) -> bool:
        return not any(self.data.get(kind) for kind in RECORD_KINDS)


class KVWorker:
    """The worker role: paged KV tensors in, bytes out (prefill) or bytes in (decode)."""

    def __init__(self, s: ConnectorSettings, producer: bool, consumer: bool, num_blocks: int) -> None:
        config = transport_config(s)
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # before the threads start (see SWITCH_INTERVAL_S)
        self._num_blocks = num_blocks
        self._connect_timeout = s.transfer.connect_timeout_s
        self._plane = nccl_plane(s)
        self.dialer = Dialer(config, s.node_id) if producer else None
        dial: Dial | None = self.dialer
        if self.dialer is not None and self._plane is not None:
            dial = nccl_dialer(config, self._plane, s.node_id)
        self.sender = Sender(dial, self._connect_timeout, s.transfer.fault_every) if dial else None
        self.receiver = listen(s, config, self._plane) if consumer else None
        self._layers: list[torch.Tensor] = []  # per layer: [num_blocks, block bytes] as uint8
        self._index: dict[str, int] = {}
        self._outgoing: dict[str, Outgoing] = {}
        self._submitted: dict[str, set[int]] = {}
        self._sent: set[str] = set()
        self._finished: set[str] = set()
        self._loading: dict[str, tuple[int, ...]] = {}  # request -> blocks its load writes
        self._load_errors: set[int] = set()
        self._records: dict[str, list[dict[str, object]]] = {kind: [] for kind in RECORD_KINDS}

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for name, kv in kv_caches.items():
            # Each block must be one contiguous run of bytes: whole blocks are what travels.
            if kv.shape[0] != self._num_blocks or not kv.is_contiguous():
                raise RuntimeError(
                    f"KV cache of {name} has shape {tuple(kv.shape)}; pdserve needs contiguous "
                    f"[num_blocks={self._num_blocks}, ...] per layer"
                )
            self._index[name] = len(self._layers)
            self._layers.append(kv.view(torch.uint8).reshape(self._num_blocks, -1))

    def block_views(self, layer: int, block_ids: tuple[int, ...]) -> list[Any]:
        """The blocks' bytes in order, one view per run of consecutive block ids (one contiguous span each):
        memoryviews of host memory, or slices of the device tensor for the nccl transport."""
        if self._plane is not None:
            kv = self._layers[layer]  # [num_blocks, block bytes] on the GPU
            return [kv[start:stop] for start, stop in block_runs(block_ids)]
        arr = self._layers[layer].numpy()
        return [memoryview(arr[start:stop]).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
                for start, stop in block_runs(block_ids)]

    def start_loads(self, plan: StepPlan) -> None:
        for job in plan.loads:
            if self.receiver is None:
                raise RuntimeError("a load was planned on an engine that is not a KV consumer")
            layers = [self.block_views(i, job.block_ids) for i in range(len(self._layers))]
            self._loading[job.req_id] = job.block_ids
            self.receiver.load(job.req_id, job.spec, layers)

    def save_layer(self, layer_name: str, plan: StepPlan) -> None:
        layer = self._index.get(layer_name)
        if layer is not None:
            for job in plan.saves:
                if job.spec.layerwise:
                    self._submit(job.req_id, job, layer)

    def end_forward(self, plan: StepPlan) -> None:
        """The step's forward is done: every layer of every save goes out now if it has not yet."""
        now = time.time()
        for job in plan.saves:
            for layer in range(len(self._layers)):
                self._submit(job.req_id, job, layer)
            self._outgoing[job.req_id].compute_end = now

    def _submit(self, req_id: str, job: Any, layer: int) -> None:
        assert self.sender is not None, "a save was planned on an engine that is not a KV producer"
        if req_id not in self._outgoing:
            self._outgoing[req_id] = Outgoing(req_id, job.spec, len(self._layers))
            self._submitted[req_id] = set()
        done = self._submitted[req_id]
        if layer not in done:
            done.add(layer)
            if self._plane is not None:
                # NCCL reads the blocks on its own stream: the kernels that wrote them must be done first.
                # (Waiting on an event recorded here, on NCCL's stream, would keep the overlap; not done yet.)
                torch.cuda.current_stream().synchronize()
            self.sender.submit(self._outgoing[req_id], layer, self.block_views(layer, job.block_ids))

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(sends done for requests the scheduler finished, loads done) since the last call."""
        self._finished |= finished_req_ids & self._outgoing.keys()
        if self.sender is not None:
            for out in self.sender.completed():
                self._sent.add(out.req_id)
                self._records["sent"].append(out.record())
        sent = self._sent & self._finished
        for req_id in sent:
            del self._outgoing[req_id], self._submitted[req_id]
        self._sent -= sent
        self._finished -= sent
        recvd: set[str] = set()
        if self.receiver is not None:
            for landed in self.receiver.completed():
                recvd.add(landed.req_id)
                self._records["recv"].append(landed.record())
                blocks = self._loading.pop(landed.req_id, ())
                if not landed.ok:
                    self._load_errors.update(blocks)  # vLLM recomputes what these blocks should have held
                    log.warning("KV load of %s failed (%s); the engine recomputes it", landed.req_id, landed.error)
        return sent, recvd

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_records(self) -> dict[str, list[dict[str, object]]] | None:
        if self.sender is not None:
            self._records["dial"] += self.sender.dialed()
        if not any(self._records.values()):
            return None
        records, self._records = self._records, {kind: [] for kind in RECORD_KINDS}
        return records

    def probe(self, peers: list[tuple[str, str]]) -> list[dict[str, str]]:
        """Dials each (instance id, KV address) once and hangs up; a failure record per peer not reached."""
        if self.dialer is None:
            raise RuntimeError("only a KV producer (a prefill engine) dials decode workers")
        return self.dialer.probe(peers, self._connect_timeout)

    def release(self, transfer_ids: list[str]) -> int:
        return self.receiver.release(transfer_ids, len(self._layers)) if self.receiver is not None else 0

    def state(self) -> dict[str, int]:
        state = {"outgoing": len(self._outgoing), "switch_interval_us": round(sys.getswitchinterval() * 1e6)}
        if self.receiver is not None:
            state.update(self.receiver.state())
        return state

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
        if self._plane is not None:
            self._plane.close()


class PdConnector(KVConnectorBase_V1):
    """The connector vLLM instantiates (`kv_connector="PdConnector"`, module `kv_transfer.connector`)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self.planner: TransferPlanner | None = None
        self.worker: KVWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.planner = TransferPlanner(self._block_size)
        else:
            tc = self._kv_transfer_config
            self.worker = KVWorker(
                ConnectorSettings.from_extra(dict(tc.kv_connector_extra_config or {})),
                producer=tc.is_kv_producer,
                consumer=tc.is_kv_consumer,
                num_blocks=kv_cache_config.num_blocks,
            )

    # ---- scheduler role ----

    def _spec(self, request: Request) -> Spec | None:
        try:
            return from_params(request.kv_transfer_params)
        except ValueError as e:  # the router never sends this; a bad spec must not take the engine down
            log.warning("request %s: ignoring malformed kv_transfer_params: %s", request.request_id, e)
            return None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.planner is not None
        return self.planner.matched_tokens(request.request_id, self._spec(request), num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.planner is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else ()
        self.planner.allocated(request.request_id, self._spec(request), block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.planner is not None
        so = scheduler_output
        step = [Scheduled(r.req_id, r.num_computed_tokens, so.num_scheduled_tokens[r.req_id])
                for r in so.scheduled_new_reqs]
        cached = so.scheduled_cached_reqs
        step += [Scheduled(rid, cached.num_computed_tokens[i], so.num_scheduled_tokens[rid])
                 for i, rid in enumerate(cached.req_ids)]
        manager = self._kv_cache_manager
        assert manager is not None, "vLLM binds the KV cache manager before scheduling"
        return PdMetadata(self.planner.plan(step, lambda rid: manager.get_block_ids(rid)[0]))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.planner is not None
        return self.planner.finished(request.request_id), None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PdTransferStats(data=data) if data else PdTransferStats()

    # ---- worker role ----

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdMetadata)
        return meta.plan

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the scheduler runs a request only once all its layers landed

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.save_layer(layer_name, self._plan())

    def wait_for_save(self) -> None:
        assert self.worker is not None
        self.worker.end_forward(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        sent, recvd = self.worker.finished(finished_req_ids)
        return sent or None, recvd or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.worker is None:
            return None
        records = self.worker.take_records()
        return PdTransferStats(data=records) if records else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
