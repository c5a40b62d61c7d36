"""loopback-listeners: every socket the server opens besides its HTTP API listens on 127.0.0.1 only.

Security back-port. From v0.2.4post1 the balance_serve backend starts a scheduler process whose
ZMQ ROUTER socket accepts pickled RPCs (``server/balance_serve/sched_rpc.py``) and binds it to
every interface, ``tcp://*:{sched_port}``; anyone who reaches the port can drive the scheduler.
Upstream fixed that in the legacy tree after v0.4.1 (``tcp://127.0.0.1:`` in v0.7.0's
``archive/``); the clients always connect to ``tcp://localhost``, so loopback loses nothing.
The same process also starts two Prometheus exposers on ``0.0.0.0`` (the scheduler's
``sched_metrics_port`` in ``csrc/balance_serve/sched/scheduler.cpp`` and KVC2's
``metrics_port`` in ``csrc/balance_serve/kvc2/src/prefix.cpp``), still so at v0.7.0: they move
to ``127.0.0.1`` too. The other binds are not network listeners: ``ipc://`` and ``inproc://``
sockets, and ``util/utils.py``'s ``get_free_ports``, which binds port 0 only to learn a free
port number and closes it. The HTTP API keeps its host (``--host``; the compose file publishes
it on ``KTLEGACY_BIND`` only).

0.2.1.post1 has no balance_serve and opens no listener but the API, so the overlay is not for it.
"""

from ktlegacy.core.overlay import Overlay

SCHED_RPC = "ktransformers/server/balance_serve/sched_rpc.py"
SCHEDULER = "csrc/balance_serve/sched/scheduler.cpp"
KVC2 = "csrc/balance_serve/kvc2/src/prefix.cpp"

EDITS = (
    (SCHED_RPC, 'self.frontend.bind(f"tcp://*:{main_args.sched_port}")',
     'self.frontend.bind(f"tcp://127.0.0.1:{main_args.sched_port}")',
     "scheduler ZMQ RPC socket: every interface -> 127.0.0.1"),
    (SCHEDULER, '.endpoint = "0.0.0.0:" + std::to_string(settings.sched_metrics_port),',
     '.endpoint = "127.0.0.1:" + std::to_string(settings.sched_metrics_port),',
     "scheduler metrics exposer: 0.0.0.0 -> 127.0.0.1"),
    (KVC2, 'met_conf.endpoint = "0.0.0.0:" + std::to_string(config.metrics_port);',
     'met_conf.endpoint = "127.0.0.1:" + std::to_string(config.metrics_port);',
     "KVC2 metrics exposer: 0.0.0.0 -> 127.0.0.1"),
)


class LoopbackListenersOverlay(Overlay):
    name = "loopback-listeners"
    summary = "balance_serve scheduler RPC socket and metrics exposers bind 127.0.0.1, not every interface"
    not_applicable = {"0.2.1.post1": "no balance_serve: the server opens no listener besides the HTTP API"}

    def apply(self, tree, ctx):
        # At v0.7.0 the RPC socket is already on loopback (upstream's fix): replace() sees the
        # finished edit and changes nothing; a tree with neither form is drift.
        for rel, old, new, what in EDITS:
            tree.replace(rel, old, new, what=what)


OVERLAY = LoopbackListenersOverlay()
