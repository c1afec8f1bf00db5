from semipd.shared.runtime import die_with_parent

die_with_parent()  # before the slow imports: a worker still importing torch dies with its controller

from semipd.services.decode.worker import run  # noqa: E402 (after die_with_parent)
from semipd.services.worker import worker_main  # noqa: E402

worker_main("decode", run)
