"""Sluice against the better of NGINX and HAProxy round by round, from the runs of one
benchmark (its raw lines or the "runs" of its JSON result). Shared by report.py (one run) and
pool.py (several runs pooled)."""

PROXIES = ("sluice", "nginx", "haproxy")


def per_round(runs, workload, key, higher_better=True):
    """Sluice's value over the better of the other two, one ratio per round; None when a run of
    the workload failed or the workload was not measured. Each round measures the three in
    turn, so a drift in the machine's speed between rounds cancels out: the k-th run of each
    proxy on a workload is from round k."""
    vals = {p: [r.get(key) for r in runs if r["proxy"] == p and r["workload"] == workload]
            for p in PROXIES}
    rounds = [(s, n, h) for s, n, h in zip(*vals.values()) if None not in (s, n, h)]
    if not rounds or any(r["proxy"] in vals and r["workload"] == workload and not r["ok"] for r in runs):
        return None
    pick = max if higher_better else min
    return [s / pick(n, h) for s, n, h in rounds if pick(n, h)] or None


def ahead(ratios, higher_better=True):
    """The rounds in which Sluice was level with the better of the two or ahead of it."""
    return sum(1 for x in ratios if (x >= 1 if higher_better else x <= 1))
