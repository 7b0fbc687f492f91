"""What the benchmark measures with, in the step bench and the recipe bench alike: the device's name, the CUDA
sync around a clock read, peak memory per case (MemoryProbe) and other processes' share of the CPUs (CpuShare)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so a case's RSS growth is its own and not a reuse of an earlier's."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc


def _reset_peak_rss() -> bool:
    """Linux: set VmHWM (the peak RSS) back to the current RSS; False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("CUDA: torch.cuda.max_memory_allocated per case, after reset_peak_memory_stats (weights, "
                "gradients, optimizer state, activations; not the CUDA context or the allocator's cache)")
    return ("CPU: peak RSS growth of this process per case: VmHWM minus the RSS before the case built its "
            "model (freed memory handed back with malloc_trim first; the peak reset through /proc/self/clear_refs "
            "once the model is built, so the full VGG16 that torchvision creates and the bench cuts does not "
            "count); weights, gradients, optimizer state and activations; loader workers are other processes "
            "and not counted")


class CpuShare:
    """How much of the machine's CPU time other processes took while a case ran: on a shared machine their
    load slows the figures down, and this says by how much they can be trusted. Linux (/proc/stat) only."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal (seconds * CLK_TCK); steal: taken by the hypervisor
        ticks = [int(value) for value in lines[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        own = os.times()  # this process and its reaped children (loader workers, once shut down)
        return busy, own.user + own.system + own.children_user + own.children_system, time.perf_counter(), cpus

    def others(self) -> float | None:
        """Share (0..1) of all CPUs' time that other processes used since this object was made."""
        gc.collect()  # shuts down loaders' worker processes still referenced by cycles, so their time is ours
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        busy, own, wall = (later - earlier for earlier, later in zip(self.start[:3], end[:3]))
        cpus = end[3]
        return min(max((busy - own) / (wall * cpus), 0.0), 1.0) if wall > 0 and cpus else None


class MemoryProbe:
    """Peak memory of one case: begin() before it builds anything, ready() once built, peak_mib() at the end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_kib = None
        self.reset_ok = False

    def begin(self) -> MemoryProbe:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.start_kib = _proc_status_kib("VmRSS")
        return self

    def ready(self) -> None:
        if self.device.type != "cuda":
            _release_freed_memory()
            self.reset_ok = _reset_peak_rss()

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak_kib = _proc_status_kib("VmHWM")
        if not self.reset_ok or peak_kib is None or self.start_kib is None:
            return None
        return max(peak_kib - self.start_kib, 0) / 1024
