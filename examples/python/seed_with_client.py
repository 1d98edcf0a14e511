"""Build the seed scenario through a Python client generated from openapi/openapi.json, then
read back the rollout and health views. CI generates the client with openapi-python-client and
runs this against a live API (.ci/python-client); it is also a usage example.

Environment: SLUICE_API, SLUICE_ADMIN_TOKEN, CERT_DIR (from `sluice-api demo-certs`),
REDMINE_SERVERS, ODOO_SERVERS, GRPC_SERVERS (space-separated host:port lists).
"""

import os
import sys
import time

from sluice_client import AuthenticatedClient
from sluice_client.api.backends import create_backend, get_backend_health, get_health
from sluice_client.api.certificates import create_certificate
from sluice_client.api.config import get_config, get_rollout
from sluice_client.api.hosts import create_host
from sluice_client.models import (
    BackendInput,
    BackendOut,
    CertificateInput,
    CertificateOut,
    HostInput,
    HostOut,
    Mode,
    Problem,
    Protocol,
    ServerInput,
)


def expect(value, kind, what):
    if not isinstance(value, kind):
        sys.exit(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def wait(what, probe, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def main():
    client = AuthenticatedClient(base_url=os.environ["SLUICE_API"], token=os.environ["SLUICE_ADMIN_TOKEN"])
    certs = os.environ["CERT_DIR"]
    servers = {k: os.environ[f"{k.upper()}_SERVERS"].split() for k in ("redmine", "odoo", "grpc")}

    with open(f"{certs}/edge.pem") as chain, open(f"{certs}/edge.key") as key:
        cert = create_certificate.sync(
            client=client, body=CertificateInput(name="beerme", cert_pem=chain.read(), key_pem=key.read())
        )
    cert = expect(cert, CertificateOut, "create_certificate")
    assert "PRIVATE KEY" not in str(cert.to_dict()), "the key never comes back"
    print(f"certificate {cert.name}: covers {cert.sans}, expires {cert.not_after}")

    backends = {}
    for name, protocol in (("redmine", Protocol.HTTP), ("odoo", Protocol.TCP), ("grpc", Protocol.H2C)):
        body = BackendInput(name=name, protocol=protocol, servers=[ServerInput(address=a) for a in servers[name]])
        backends[name] = expect(create_backend.sync(client=client, body=body), BackendOut, f"create_backend {name}")
        print(f"backend {name}: {protocol.value}, {len(servers[name])} server(s)")

    # A typed error: a host naming a backend that does not exist is refused, naming the field.
    bad = create_host.sync(
        client=client,
        body=HostInput(hostname="nowhere.beerme", mode=Mode.TERMINATE, backend_id="00000000-0000-0000-0000-000000000000"),
    )
    bad = expect(bad, Problem, "a host with an unknown backend")
    assert bad.status == 422 and "backend_id" in str(bad.to_dict()), bad.to_dict()
    print(f"refused as expected: {bad.status} {bad.title}")

    for hostname, mode, backend in (
        ("redmine.beerme", Mode.TERMINATE, "redmine"),
        ("odoo.beerme", Mode.PASSTHROUGH, "odoo"),
        ("grpc.beerme", Mode.TERMINATE, "grpc"),
    ):
        body = HostInput(hostname=hostname, mode=mode, backend_id=backends[backend].id)
        if mode == Mode.TERMINATE:
            body.certificate_id = cert.id
        expect(create_host.sync(client=client, body=body), HostOut, f"create_host {hostname}")
        print(f"host {hostname}: {mode.value} -> {backend}")

    version = get_config.sync(client=client).version
    rollout = wait(
        f"every worker to apply version {version}",
        lambda: (r := get_rollout.sync(version, client=client))
        and r.workers
        and all(w.status == "applied" for w in r.workers)
        and r,
    )
    for w in rollout.workers:
        print(f"rollout of v{version}: worker {w.name} {w.status}")

    health = wait(
        "the redmine servers to be reported up",
        lambda: (h := get_backend_health.sync(backends["redmine"].id, client=client))
        and all(s.status == "up" for s in h.servers)
        and h,
    )
    for s in health.servers:
        verdicts = ", ".join(f"{v.worker_name}: {v.status}" for v in s.workers)
        print(f"health of {s.address}: {s.status} ({verdicts})")
    summary = {b.name: b for b in get_health.sync(client=client)}
    assert summary["redmine"].up == len(servers["redmine"]), summary["redmine"]
    print("seed scenario built through the generated client")


if __name__ == "__main__":
    main()
