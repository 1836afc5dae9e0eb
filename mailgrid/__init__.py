"""mailgrid: what every service shares (settings, errors, bus, stubs, CLI)."""

import os

__version__ = "0.1.0"

# Before anything imports grpc. With gRPC's fork support on (its default), a fork runs
# gRPC's handlers, which restart its poller threads in the child; subprocess then closes
# the child's descriptors before exec, and a poller left waiting on a closed epoll fd
# aborts the child ("epoll_wait error: Bad file descriptor"): about one spawn in a
# hundred once `mailgrid up` has gRPC channels open, since it forks its services with a
# preexec_fn (PR_SET_PDEATHSIG). mailgrid never uses gRPC across a fork: every child
# execs at once. An explicit setting in the environment is kept.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
