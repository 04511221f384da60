"""The replicas' lives: loaded when the server starts, watched while they serve, restarted when their worker process
stops, and stopped with the server, so that no worker outlives it.

In-process replicas (``--replicas N``) load one after another, as before; worker replicas (``--devices``) load at
once, one process per device. A worker that stops (killed, crashed) is out of service (``EnginePool.lost``) until
its restart, one attempt per stop, has loaded; ``/ready`` and ``streamchat_replica_up`` report it meanwhile, and the
others keep serving.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import crash
from appliance.engines.worker import WorkerEngine, stop_loading
from appliance.errors import StreamChatError
from appliance.loading import LoadedModel
from appliance.service.config import ServiceConfig
from appliance.service.pool import EnginePool, Replica


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Replicas:
    """Loads ``config.size`` replicas into ``pool`` with ``load(index)``; ``failed`` hears a load that fails at start
    (the server then stops)."""

    def __init__(self, pool: EnginePool, config: ServiceConfig, load: Callable[[int], LoadedModel],
                 failed: Callable[[BaseException], None]) -> None:
        self.pool, self.config, self.load, self.failed = pool, config, load, failed
        self._lock = threading.Lock()  # guards _opened against close()
        self._opened: list[Replica] = []
        pool.on_down = self._restart

    def start(self) -> None:
        threading.Thread(target=self._load_all, name="streamchat-load", daemon=True).start()

    def _load_all(self) -> None:
        try:
            if self.config.devices:
                replicas = self._open_at_once(range(self.config.size))
                where = (f"devices {','.join(map(str, self.config.devices))}: worker pids "
                         f"{', '.join(str(r.worker.pid) for r in replicas if r.worker)}")
            else:
                replicas = []
                for index in range(self.config.size):
                    replicas.append(self._open(index))
                    self.pool.add(replicas[-1])
                where = f"{len(replicas)} replica(s)"
            _say(f"StreamChat serving {replicas[0].model.label} on {self.config.url} "
                 f"({where})")
        except BaseException as exc:  # raised by ``serve`` once the server has stopped
            self.failed(exc)

    def _open_at_once(self, indices: Iterable[int]) -> list[Replica]:
        """One loading thread per worker: every device loads its model at the same time."""
        opened: dict[int, Replica | BaseException] = {}

        def open_one(index: int) -> None:
            try:
                opened[index] = self._open(index)
            except BaseException as exc:
                opened[index] = exc

        threads = [threading.Thread(target=open_one, args=(i,), daemon=True) for i in indices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [opened[i] for i in sorted(opened)]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for replica in results:
            self.pool.add(replica)
        return results

    def _open(self, index: int) -> Replica:
        model = self.load(index)
        worker = model.engine if isinstance(model.engine, WorkerEngine) else None
        replica = Replica(index, model, self.config.devices[index] if self.config.devices else None, worker)
        with self._lock:
            closing = self.pool.closing
            if not closing:
                self._opened.append(replica)
        if closing:
            if replica.worker:
                replica.worker.close()
            raise StreamChatError("the server is shutting down")
        if replica.worker:
            threading.Thread(target=self._watch, args=(replica,), name=f"streamchat-watch-{index}", daemon=True).start()
        return replica

    def _watch(self, replica: Replica) -> None:
        assert replica.worker is not None
        self.pool.lost(replica, replica.worker.wait())

    def _restart(self, replica: Replica) -> None:
        """``EnginePool.on_down``, on the event loop: load the replica again in the background."""
        _say(f"replica {replica.index} (device {replica.device}) is out of service: {replica.stopped}; restarting it")
        threading.Thread(target=self._reopen, args=(replica,), name="streamchat-restart", daemon=True).start()

    def _reopen(self, old: Replica) -> None:
        try:
            new = self._open(old.index)
        except BaseException as exc:
            old.stopped += f"; restarting it failed: {crash.one_line(exc, 'restarting a replica')}"
            _say(f"replica {old.index} (device {old.device}) stays out of service: {old.stopped}")
            self.pool.gave_up(old)
            return
        self.pool.add(new)
        _say(f"replica {new.index} (device {new.device}) is serving again (worker pid {new.worker.pid})")

    def close(self) -> None:
        """Shutdown, once no answer runs: every worker is stopped and reaped, those still loading too (their load
        then fails, and a replica that loads meanwhile is stopped as soon as it has)."""
        with self._lock:
            self.pool.closing = True
            opened = list(self._opened)
        stop_loading()
        for replica in opened:
            if replica.worker:
                replica.worker.close()


class ReplicaCollector(Collector):
    """Per replica: up (1) or out of service (0), and the requests handed to it, labelled with its index, device and
    the process that runs its engine (the server's own for in-process replicas)."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["replica", "device", "pid"]
        up = GaugeMetricFamily("streamchat_replica_up", "1 while the replica serves, 0 while its worker is stopped",
                               labels=labels)
        requests = CounterMetricFamily("streamchat_replica_requests", "requests handed to the replica", labels=labels)
        for replica, state in [*((r, 1) for r in list(self.pool.replicas)),
                               *((r, 0) for r in list(self.pool.down.values()))]:
            key = [str(replica.index), "" if replica.device is None else str(replica.device),
                   str(replica.worker.pid if replica.worker else os.getpid())]
            up.add_metric(key, state)
            requests.add_metric(key, replica.answers)
        yield up
        yield requests
