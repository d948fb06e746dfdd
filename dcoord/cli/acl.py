"""``dcoord acl``: print what confines a server user to one dcoord namespace.

``dcoord acl redis NS`` prints the ``ACL SETUSER`` rule (for a ``redis-cli`` prompt),
``dcoord acl etcd NS`` the ``etcdctl`` role commands (shell lines), for an operator to
paste. The password is a placeholder the
operator replaces: the command never takes a secret, so none can leak into its output,
a shell history or a process list. tests/conformance/test_redis_acl.py and
test_etcd_rbac.py run exactly what these functions return (docs/security.md shows it).
"""

from __future__ import annotations

import argparse
import shlex

from ..backends.etcd_names import namespace_prefix
from ..config import _namespace

#: What the operator replaces by the user's password.
PASSWORD = "PASSWORD"

# Every command dcoord (its Lua scripts included: they run with the caller's permissions)
# sends to Redis. Removing one breaks a primitive with PermissionDenied.
REDIS_COMMANDS = (
    "info",
    "client|setname",
    "evalsha",
    "script|load",
    "get",
    "set",
    "del",
    "mget",
    "scan",
    "zrange",
    "zrangebyscore",
    "zadd",
    "zrem",
    # The fair lock's queue (a list of waiting tokens, a sorted set of their deadlines).
    "rpush",
    "lpop",
    "lindex",
    "lrem",
    "zscore",
    "hset",
    "hget",
    "hdel",
    "hmget",
    "incr",
    "pttl",
    "pexpire",
    "time",
    "publish",
    "subscribe",
    "unsubscribe",
    "ping",
    "wait",  # after forced 2PC log writes, with min_replicas
    # Reads of a lock or a leader that must agree (value and TTL at one instant).
    "multi",
    "exec",
    # `dcoord locks` counts a lock's waiters by its release channel's subscribers (this
    # can count any channel's; it reads no message).
    "pubsub|numsub",
)
# What a Redis Cluster client sends as well: redis-py reads the slot map and the command
# table when it connects, and dcoord's wake-ups are shard channels there.
REDIS_CLUSTER_COMMANDS = ("cluster|slots", "command", "spublish", "ssubscribe", "sunsubscribe")


def redis_acl_rule(
    namespace: str,
    *,
    user: str | None = None,
    password: str = PASSWORD,
    database: int = 0,
    cluster: bool = False,
) -> list[str]:
    """The ``ACL SETUSER`` command (as arguments) for a user confined to ``namespace``.

    Keys and pub/sub channels of a namespace both start with ``dcoord:NS:``. ``user``
    defaults to the namespace; ``database`` other than 0 needs ``select`` too, a Redis
    Cluster (``cluster``; run the rule on every node: they do not share users) the
    commands of REDIS_CLUSTER_COMMANDS.
    """
    ns = _namespace("namespace", namespace)
    commands = [*REDIS_COMMANDS, "select"] if database else list(REDIS_COMMANDS)
    if cluster:
        commands += REDIS_CLUSTER_COMMANDS
    return [
        "ACL",
        "SETUSER",
        user or ns,
        "on",
        f">{password}",
        f"~dcoord:{ns}:*",
        f"&dcoord:{ns}:*",
        *(f"+{command}" for command in commands),
    ]


def etcd_role(namespace: str) -> str:
    """The etcd role that grants one namespace: ``dcoord-NS``."""
    return f"dcoord-{_namespace('namespace', namespace)}"


def etcd_rbac_commands(
    namespace: str, *, user: str | None = None, password: str = PASSWORD
) -> list[list[str]]:
    """The ``etcdctl`` commands (without endpoint options) that create a user confined
    to ``namespace``: a role with ``readwrite`` on the prefix ``/dcoord/NS/``.

    Leases need no permission of their own (granting, keep-alive), and a put with a lease
    or a revoke needs write on the lease's keys, which all lie under the prefix.
    """
    role = etcd_role(namespace)
    name = user or namespace
    return [
        ["etcdctl", "role", "add", role],
        [
            "etcdctl",
            "role",
            "grant-permission",
            role,
            "readwrite",
            namespace_prefix(namespace),
            "--prefix",
        ],
        ["etcdctl", "user", "add", name, f"--new-user-password={password}"],
        ["etcdctl", "user", "grant-role", name, role],
    ]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``acl`` command."""
    p = subparsers.add_parser(
        "acl",
        help="print the server rule that confines a user to one namespace",
        description=(
            "Print the Redis ACL rule (redis) or the etcdctl role commands (etcd) that let "
            "a user run every dcoord primitive in NAMESPACE and nothing in any other. "
            f"Replace {PASSWORD} by the user's password; see docs/security.md for what "
            "neither server can confine."
        ),
    )
    p.add_argument("server", choices=("redis", "etcd"), help="the backend kind")
    p.add_argument("namespace", metavar="NAMESPACE", help="the dcoord namespace to confine to")
    p.add_argument("--user", help="the server user name (default: the namespace)")
    p.add_argument(
        "--database",
        type=int,
        default=0,
        help="redis: the database number the URL names (not 0 adds +select)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="redis: for a Redis Cluster (run the rule on every node)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the rule (a line for a redis-cli prompt) or the commands (shell lines)."""
    if args.server == "redis":
        # Unquoted, as redis-cli's prompt takes it; a shell would read ">PASSWORD" as a
        # redirection, hence no "redis-cli" prefix to invite pasting it there.
        rule = redis_acl_rule(
            args.namespace, user=args.user, database=args.database, cluster=args.cluster
        )
        print(" ".join(rule))
    else:
        for command in etcd_rbac_commands(args.namespace, user=args.user):
            print(shlex.join(command))
    return 0
