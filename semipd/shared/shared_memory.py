"""Memory one process allocates and others map without copying.

On the CPU a POSIX shared-memory segment; on CUDA one cudaMalloc made through CuPy, exported as a
CUDA IPC handle (torch's caching allocator would hand out pieces of larger blocks, so the arena
allocates directly). Either way it arrives as a flat uint8 torch tensor, and the handle is a small
dict that travels in a msgpack message.
"""

from multiprocessing import resource_tracker, shared_memory

import torch

from semipd.shared.runtime import owned_name


def attach_segment(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name)
    # Python 3.11 registers attached segments with the resource tracker, which unlinks them when
    # this process's tracker exits: an attaching worker would destroy the memory. Only the creator
    # may unlink, so take the registration back.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def unlink_segment(shm: shared_memory.SharedMemory) -> None:
    # An attacher spawned by multiprocessing shares the creator's tracker, so its unregister may
    # have removed our entry; re-add it so that unlink()'s own unregister finds one.
    resource_tracker.register(shm._name, "shared_memory")
    shm.unlink()


class SharedArena:
    def __init__(self, tensor: torch.Tensor, handle: dict, owner, is_creator: bool):
        self.tensor, self.handle = tensor, handle
        self._owner, self._is_creator = owner, is_creator

    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> "SharedArena":
        if device.type == "cuda":
            import cupy
            with cupy.cuda.Device(device.index or 0):
                mem = cupy.cuda.Memory(nbytes)
                handle = cupy.cuda.runtime.ipcGetMemHandle(mem.ptr)
            array = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
            tensor = torch.as_tensor(array, device=device)
            return cls(tensor, {"cuda_ipc": bytes(handle), "nbytes": nbytes, "device": device.index or 0}, mem, True)
        shm = shared_memory.SharedMemory(owned_name("arena"), create=True, size=max(nbytes, 1))
        tensor = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        return cls(tensor, {"shm": shm.name, "nbytes": nbytes}, shm, True)

    @classmethod
    def open(cls, handle: dict) -> "SharedArena":
        nbytes = handle["nbytes"]
        if "cuda_ipc" in handle:
            import cupy
            with cupy.cuda.Device(handle["device"]):
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle["cuda_ipc"])
            mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner=None, device_id=handle["device"])
            array = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
            return cls(torch.as_tensor(array, device=f"cuda:{handle['device']}"), handle, ptr, False)
        shm = attach_segment(handle["shm"])
        tensor = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        return cls(tensor, handle, shm, False)

    def view(self, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        return self.tensor.view(dtype).view(shape)

    def close(self) -> None:
        """The creator frees the memory; an opener only unmaps. Tensors over it must be dropped
        first (on the CPU a live view keeps the segment's buffer exported)."""
        owner, self._owner, self.tensor = self._owner, None, None
        if owner is None:
            return
        if isinstance(owner, shared_memory.SharedMemory):
            try:
                owner.close()
            except BufferError:  # a tensor still maps it; the OS unmaps at exit
                pass
            if self._is_creator:
                unlink_segment(owner)
        elif not self._is_creator:
            import cupy
            cupy.cuda.runtime.ipcCloseMemHandle(owner)
