"""`semipd serve`: start the controller, which starts the workers, and serve until a signal."""

import os
import signal
import sys

from services.controller.server import Controller
from shared.engine import EngineConfig


def serve(args) -> None:
    from shared.client import default_address
    from shared.runtime import runtime_dir
    address = args.address or default_address()
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, page_size=args.page_size,
                          num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len)
    # Workers connect over a private socket in the runtime folder, never over the network.
    worker_address = f"ipc://{runtime_dir()}/workers-{os.getpid()}.sock"
    controller = Controller(config, address, worker_address)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        controller.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        controller.close()
        for addr in (address, worker_address):
            if addr.startswith("ipc://") and os.path.exists(addr[len("ipc://"):]):
                os.unlink(addr[len("ipc://"):])
