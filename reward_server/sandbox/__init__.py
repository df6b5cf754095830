"""The sandbox: everything that runs next to untrusted code, standard library only.

    pool.py        executors: a pool of prewarmed fork servers (fast path) or a fresh interpreter
                   per execution (naive reference path); runs on the grader side
    forkserver.py  the long-lived per-slot process that forks one isolated child per check
    isolation.py   what a child can see and keep: allow-list root, namespaces, audit guard, sweeps
    wire.py        control frames between grader and fork server; a run's outputs read with caps
    harness.py     what the child runs: setup + program + one check
    plain.py       the plain-data wire format a child reports values in (decoded by the grader)

Nothing in this package imports from the rest of rankguard: fork servers are started from its
source text alone (see pool.BOOT).
"""
from reward_server.sandbox.pool import (
    ISOLATIONS,
    REPO_ROOT,
    ExecJob,
    ExecResult,
    ForkServer,
    FreshExecutor,
    SandboxConfig,
    SandboxError,
    SandboxPool,
    bwrap_argv,
    bwrap_works,
    default_allow,
    fallback_allowed,
    ALLOW_FALLBACK_ENV,
    FALLBACK_REFUSED,
    default_hide,
    make_executor,
)

__all__ = ["ISOLATIONS", "REPO_ROOT", "ExecJob", "ExecResult", "ForkServer", "FreshExecutor", "SandboxConfig",
           "SandboxError", "SandboxPool", "bwrap_argv", "bwrap_works", "default_allow", "default_hide",
           "fallback_allowed", "ALLOW_FALLBACK_ENV", "FALLBACK_REFUSED",
           "make_executor"]
