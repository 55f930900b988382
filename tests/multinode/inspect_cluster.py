"""A second Ray driver, run inside node A's namespace, that looks at a running deployment's workers: each one's
process id and KV address, and the start-up check of the KV links (`pdserve.links.check_links`) run against them.
Prints one JSON line: {"instances": [{"instance_id", "role", "pid", "kv_address"}], "links": "ok" | error text}.

    python -m tests.multinode.inspect_cluster --address 10.213.0.1:6379 --namespace pdserve-multinode
"""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace
from typing import Any

import ray

from pdserve.links import KVLinksDown, check_links


async def links(instances: list[Any]) -> str:
    try:
        await check_links(instances)
    except KVLinksDown as e:
        return str(e)
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", required=True)
    args = parser.parse_args()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    instances = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] != args.namespace:
            continue
        handle = ray.get_actor(actor["name"], namespace=args.namespace)
        instance_id = actor["name"].partition("@")[0]
        info = ray.get(handle.start.remote())  # a running worker's info: a no-op start
        instances.append(SimpleNamespace(instance_id=instance_id, role=instance_id.rpartition("-")[0],
                                         handle=handle, info=info, pid=ray.get(handle.pid.remote())))
    report = {
        "instances": [{"instance_id": i.instance_id, "role": i.role, "pid": i.pid, "kv_address": i.info.kv_address}
                      for i in sorted(instances, key=lambda i: i.instance_id)],
        "links": asyncio.run(links(instances)),
    }
    print(json.dumps(report))
    ray.shutdown()


if __name__ == "__main__":
    main()
