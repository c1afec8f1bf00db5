"""`semipd serve`: start the controller, which starts the workers, and serve until a signal."""

import os
import signal
import sys

from semipd.services.controller.claim import claim, release, remove_own_leftovers
from semipd.services.controller.gateway_child import GatewayChild
from semipd.services.controller.moderation import moderation_config
from semipd.services.controller.modes import mode_from_args
from semipd.services.controller.mps import MpsDaemon, daemon_running
from semipd.services.controller.server import Controller
from semipd.services.controller.stopping import SIGNALS, Stop, StoppedWhileLoading, arm_backstop, stop_loading
from semipd.shared.engine_config import EngineConfig
from semipd.shared.runtime import (default_server_address, ipc_address, owned_name, refuse_if_listening,
                                   remove_paths, runtime_dir)
from semipd.shared.sd_notify import Notifier


def serve(args) -> None:
    systemd = Notifier.from_env()  # READY, STATUS, WATCHDOG, STOPPING under a Type=notify unit
    address = args.address or default_server_address()
    refuse_if_listening(address)
    state_file = claim(address)  # removes what a killed server left here
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, page_size=args.page_size,
                          num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
                          max_batched_tokens=args.max_batched_tokens,
                          max_model_len=args.max_model_len, prefix_cache=args.prefix_cache,
                          tp_size=args.tensor_parallel_size)
    # Workers connect over a private socket in the runtime folder, never over the network.
    worker_address = ipc_address(owned_name("workers") + ".sock")
    mode = mode_from_args(args)
    # MPS first: a process joins it (or not) when it creates its CUDA context.
    mps = MpsDaemon(os.path.join(runtime_dir(), f"mps-{os.getpid()}")) if args.start_mps else None
    controller = None
    gateway = GatewayChild(args.http, address) if args.http else None
    stop = Stop(args.drain_timeout)
    try:
        on_gpu = config.torch_device().type == "cuda"
        mode.mps = on_gpu and (mps is not None or daemon_running())
        if on_gpu and not mode.mps and not mode.unified:
            print("semipd: no MPS daemon: the SM shares are recorded but not enforced "
                  "(see --start-mps)", file=sys.stderr, flush=True)
        for sig in SIGNALS:  # while loading: the exception unwinds it, and its cleanup runs
            signal.signal(sig, stop_loading)
        systemd.status("loading weights")
        controller = Controller(config, address, worker_address, moderation_config(args), mode, stop)

        def ready():
            if gateway is not None:
                gateway.start()
            systemd.ready(controller.status())

        def on_signal(signum, frame):
            systemd.stopping()
            stop.ask(signum, frame)
        # From now on a signal only asks the loop to end: raised as an exception it could land
        # anywhere (between Popen.poll's lock and its try, in a half-sent message) and hang the
        # stop path or leave it half done (issue 25).
        for sig in SIGNALS:
            signal.signal(sig, on_signal)
        controller.serve_forever(on_ready=ready, on_turn=lambda: systemd.alive(controller.status))
    except StoppedWhileLoading as e:
        print(f"semipd: {e}: stopped while loading", file=sys.stderr, flush=True)
    finally:
        systemd.stopping()
        for sig in SIGNALS:  # one more signal (stopped while loading) must not cut the cleanup short
            signal.signal(sig, stop.ask)
        deadline = stop.deadline()
        backstop = arm_backstop(lambda: remove_own_leftovers(address))
        if controller is not None:
            controller.close(deadline)  # open HTTP streams end with its error, then the gateway stops
        if gateway is not None:
            gateway.stop(deadline)
        if mps is not None:
            mps.stop()
        remove_paths([a.removeprefix("ipc://") for a in (address, worker_address) if a.startswith("ipc://")])
        release(state_file)
        backstop.cancel()  # an error on its way out to the user is not an overrun stop
    # Stopped and cleaned up. Tearing down an interpreter with torch loaded frees nothing the
    # kernel would not and took 1.4-3.2 s here on a loaded machine, past the stop's bound.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
