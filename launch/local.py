"""Local multi-process launcher: N processes of one command on this machine, joined by
``jax.distributed`` (the same code path as a TPU pod or a GPU cluster, on one box).

    python launch/local.py --num-processes 2 --cpu-devices 4 -- \
        vita-jax train --config=stage1_2:tiny --config.mesh_shape.data=2 --workdir /tmp/run

Each process gets ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read by
``vita_jax.parallel.maybe_initialize_distributed``); ``--cpu-devices K`` gives each process K fake CPU
devices (tests, laptops); ``--gpus-per-process K`` pins each process to its own K GPUs instead.
Output lines are prefixed with ``[p<id>]``. If one process fails, the others are stopped and the
launcher exits with that process's status.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, cpu_devices: int = 0, gpus_per_process: int = 0, base=None) -> dict:
    """The environment of process ``i`` of ``n``."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    if gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * gpus_per_process + k) for k in range(gpus_per_process))
    return env


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{i}] {line}")
        out.flush()


def launch(command: list[str], num_processes: int, cpu_devices: int = 0, gpus_per_process: int = 0,
           port: int = 0, timeout: float | None = None, out=sys.stdout) -> int:
    """Runs ``command`` as ``num_processes`` processes; returns the first non-zero exit status (or 0)."""
    port = port or free_port()
    procs = [subprocess.Popen(command, env=process_env(i, num_processes, port, cpu_devices, gpus_per_process),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(num_processes)]
    pumps = [threading.Thread(target=_pump, args=(i, p.stdout, out), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    deadline = None if timeout is None else time.time() + timeout
    status = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process: returncode is set by poll
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.time() > deadline):
                status = failed[0] if failed else 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # a process waiting on a dead peer would wait forever
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="python launch/local.py --num-processes N [--cpu-devices K] -- COMMAND ...")
    p.add_argument("--num-processes", "-n", type=int, required=True)
    p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices per process (0: real devices)")
    p.add_argument("--gpus-per-process", type=int, default=0, help="pin process i to GPUs i*K .. i*K+K-1")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("no command given (put it after --)")
    print(f"launching {a.num_processes} processes: {shlex.join(cmd)}", flush=True)
    return launch(cmd, a.num_processes, a.cpu_devices, a.gpus_per_process, a.port, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
