"""`semipd serve`: start the controller, which starts the workers, and serve until a signal."""

import os
import signal
import sys

from semipd.services.controller.claim import claim, release
from semipd.services.controller.gateway_child import GatewayChild
from semipd.services.controller.moderation import moderation_config
from semipd.services.controller.modes import mode_from_args
from semipd.services.controller.mps import MpsDaemon, daemon_running
from semipd.services.controller.server import Controller
from semipd.shared.engine_config import EngineConfig
from semipd.shared.runtime import (default_server_address, ipc_address, owned_name, refuse_if_listening,
                                   remove_paths, runtime_dir)


def serve(args) -> None:
    address = args.address or default_server_address()
    refuse_if_listening(address)
    state_file = claim(address)  # removes what a killed server left here
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, page_size=args.page_size,
                          num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len)
    # Workers connect over a private socket in the runtime folder, never over the network.
    worker_address = ipc_address(owned_name("workers") + ".sock")
    mode = mode_from_args(args)
    # MPS first: a process joins it (or not) when it creates its CUDA context.
    mps = MpsDaemon(os.path.join(runtime_dir(), f"mps-{os.getpid()}")) if args.start_mps else None
    controller = None
    gateway = GatewayChild(args.http, address) if args.http else None
    try:
        on_gpu = config.torch_device().type == "cuda"
        mode.mps = on_gpu and (mps is not None or daemon_running())
        if on_gpu and not mode.mps and not mode.unified:
            print("semipd: no MPS daemon: the SM shares are recorded but not enforced "
                  "(see --start-mps)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # while loading: its cleanup runs
        controller = Controller(config, address, worker_address, moderation_config(args), mode)
        # From now on a signal only asks the loop to end: raised as an exception it could land
        # anywhere (between Popen.poll's lock and its try, in a half-sent message) and hang the
        # stop path or leave it half done (issue 25).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: controller.stop())
        controller.serve_forever(on_ready=gateway and gateway.start)
    except KeyboardInterrupt:
        pass
    finally:
        if controller is not None:
            controller.close()  # open HTTP streams end with its error, then the gateway stops
        if gateway is not None:
            gateway.stop()
        if mps is not None:
            mps.stop()
        remove_paths([a.removeprefix("ipc://") for a in (address, worker_address) if a.startswith("ipc://")])
        release(state_file)
