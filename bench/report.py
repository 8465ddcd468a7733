"""Turn bench/results/*.json (written by each scenario) into bench/report/REPORT.md and
bench/report/latency_cdf.png (latency CDFs: push next to polling).

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, OUT = HERE / "results", HERE / "report"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def lat(d: dict, key: str) -> list[str]:
    s = d.get(key) or {}
    return [f"{s.get(p, '–')} ms" for p in ("p50", "p90", "p99", "max")]


def gcs(s1: dict) -> str:
    pushing = s1.get("full_gc", {}).get("pushing")
    return "–" if pushing is None else f"{pushing['count']:g} ({pushing['longest']})"


def targets(sse: dict | None, s1s: list[dict], storms: list[dict]) -> list[str]:
    """The issue's targets for this 2-core machine, against the last run."""
    if sse is None and not storms:
        return []
    out = ["## Targets", "", row("target", "result", "met"), row("---", "---", "---")]

    def add(name: str, value: float, limit: float, unit: str, at_most: bool = True, full: bool = True,
            why: str = "the target is for 10,000") -> None:
        ok = value <= limit if at_most else value >= limit
        verdict = ("yes" if ok else "**no**") if full else f"not judged: a --quick run ({why})"
        out.append(row(f"{name} {'≤' if at_most else '≥'} {limit}{unit}", f"{value}{unit}", verdict))

    if sse is not None:
        push, full = sse["webhook_sent_to_subscriber_received_ms"], sse["subscribers"] >= 10000
        add(f"S1 SSE ({sse['subscribers']} connected) push p50", push["p50"], 5, " ms", full=full)
        add(f"S1 SSE ({sse['subscribers']} connected) push p99", push["p99"], 25, " ms", full=full)
        add("S1 SSE database queries/s spent on waiting subscribers", sse["db_queries_per_s_while_waiting"], 0, "",
            full=full)
    for d in s1s:
        add(f"S1 {d['transport'].upper()} ({d['subscribers']} connected) server memory per idle connection",
            d["server_rss_kb_per_idle_connection"], 30, " KB", full=d["subscribers"] >= 10000)
    if storms:
        best = max(storms, key=lambda d: d["share_of_raw_ceiling"])
        # A 2 s step is absorbed by queues that a sustained rate would overflow: judge only
        # the full run's 6 s steps (runs from before step_seconds was recorded were full).
        add(f"S3 share of the raw Postgres ceiling (best: {best['workers']} worker(s))",
            best["share_of_raw_ceiling"], 0.6, "", at_most=False, full=best.get("step_seconds", 6.0) >= 6.0,
            why="2 s steps flatter the sustained rate")
    return [*out, ""]


def scale_out(s6: dict, s1: dict | None) -> list[str]:
    """S6 (N nodes, one database) beside the last one-node S1 SSE run."""
    m = s6.get("machine", {})
    other = s6.get("machine_cpu_cores", {}).get("pushing", {}).get("rest_of_machine")
    out = ["## S6 scale-out: nodes on one machine", "",
           f"{s6['nodes']} `paystream serve` processes on one database, {s6['subscribers_per_node']} waiting SSE "
           f"subscribers on each; webhooks at {s6['webhook_rate_per_s']:g}/s sent round-robin to the nodes, so "
           f"{s6['cross_node_pushes']} of {s6['subscribers']} pushes crossed from one node to another. "
           f"Machine: {m.get('cpus')} × {m.get('cpu')}, {m.get('memory_gib')} GiB, PostgreSQL "
           f"{str(m.get('postgres', '?')).split()[0]}, Python {m.get('python')}; {m.get('shared', 'one host')}"
           + ("" if other is None else f" (other work on the machine while pushing: {other} cores)") + ". "
           "The one-node row is the last S1 SSE run. RSS per idle connection: the mean over the nodes, then each "
           "node; server CPU: all nodes together; DB transactions/s: the whole database.", "",
           row("nodes", "subscribers", "push p50", "p90", "p99", "max", "ack p50", "RSS/idle conn",
               "server CPU idle / pushing", "DB xact/s: none waiting / N waiting", "full GCs while pushing",
               "lost/dup"),
           row(*["---"] * 12)]
    if s1 is not None:
        out.append(row(1, s1["subscribers"], *lat(s1, "webhook_sent_to_subscriber_received_ms"),
                       f"{s1['webhook_ack_ms']['p50']} ms", f"{s1['server_rss_kb_per_idle_connection']} KB",
                       f"{s1['server_cpu_idle_cores']} / {s1['server_cpu_while_pushing_cores']} cores",
                       f"{s1['db_xacts_per_s_before_subscribers']} / {s1['db_xacts_per_s_while_waiting']}",
                       gcs(s1), f"{s1['lost']}/{s1['wrong_or_duplicated']}"))
    rss = s6["server_rss_kb_per_idle_connection"]
    out.append(row(s6["nodes"], f"{s6['nodes']} × {s6['subscribers_per_node']}",
                   *lat(s6, "webhook_sent_to_subscriber_received_ms"), f"{s6['webhook_ack_ms']['p50']} ms",
                   f"{rss['mean']} KB ({' / '.join(str(v) for v in rss['per_node'])})",
                   f"{s6['server_cpu_idle_cores']['total']} / {s6['server_cpu_while_pushing_cores']['total']} cores",
                   f"{s6['db_xacts_per_s_before_subscribers']} / {s6['db_xacts_per_s_while_waiting']}",
                   gcs(s6), f"{s6['lost']}/{s6['wrong_or_duplicated']}"))
    same, cross = s6["same_node_ms"], s6["cross_node_ms"]
    out += ["", f"Pushes whose webhook reached the subscriber's own node: p50 {same.get('p50')} ms, p99 "
            f"{same.get('p99')} ms; through another node: p50 {cross.get('p50')} ms, p99 {cross.get('p99')} ms. "
            f"Events pushed by each node: {' / '.join(str(v) for v in s6['events_pushed_by_node'])}.", ""]
    return out


def reads_per_push(s5: dict) -> list[str]:
    """S5: reads of the event log per push, pointer-only notifications against ones carrying the event."""
    out = ["## S5 database reads per push", "",
           f"One transaction watched from {s5['nodes']} nodes × {s5['subscribers_per_node']} SSE subscribers, "
           f"{s5['events']} events; reads of the event log per push, counted by the nodes "
           "(`paystream_log_reads_total`) and by Postgres (scans of `transaction_events`), with notifications "
           "carrying only a pointer (`PAYSTREAM_NOTIFY_EVENTS=0`, as before) and carrying the event (the default), "
           "in the same run.", "",
           row("notifications", "log reads per push (nodes)", "log scans per push (Postgres)", "deliveries",
               "every subscriber got every event"),
           row(*["---"] * 5)]
    for key, label in (("pointer_notifications", "a pointer"), ("event_in_notification", "the event")):
        d = s5[key]
        out.append(row(label, d["log_reads_per_push_by_nodes"], d["log_scans_per_push_by_postgres"],
                       d["deliveries"], d["every_subscriber_got_every_event"]))
    return [*out, ""]


def engines(s7: dict) -> list[str]:
    """S7: Postgres LISTEN/NOTIFY against NATS JetStream, measured in one run."""
    out = ["## S7 fan-out engines: LISTEN/NOTIFY and NATS JetStream", "",
           f"Two nodes on one database, {s7['subscribers_on_b']} SSE subscribers waiting on node B, webhooks at "
           f"{s7['rate']:g}/s to node A only (every push crosses nodes); then {s7['writers']} writers committing "
           f"logged events as fast as they can for {s7['writer_seconds']:g} s (with NATS, this process also "
           "publishes them after each commit, as a node does). Both engines in the same run, on the same machine.", "",
           row("engine", "cross-node push p50", "p90", "p99", "max", "every event once", "commits/s (8 writers)",
               "published/s", "Postgres connections per node"),
           row(*["---"] * 9)]
    for name in ("listen", "nats"):
        e = s7[name]
        out.append(row(name, *lat(e, "push_ms"), e["every_event_once"], e["writers"]["commits_per_s"],
                       e["writers"].get("published_per_s", "–"), e["postgres_connections_per_node"]))
    r = s7["nats_vs_listen"]
    out += ["", f"NATS / LISTEN: push p50 × {r['push_p50']}, p99 × {r['push_p99']}, commits/s × {r['commits_per_s']}.",
            ""]
    return out


def storage(s8: dict) -> list[str]:
    """S8: the write path on an empty and on pre-grown databases, and disk per million events."""
    def mib(b: float | None) -> str:
        return "–" if b is None else f"{b / 2**20:,.1f} MiB"

    m = s8.get("machine", {})
    backend = s8.get("postgres_backend", "system")
    out = [f"## S8 storage: the write path on a full database ({backend} Postgres)", "",
           f"{m.get('postgres')}, autovacuum {m.get('postgres_settings', {}).get('autovacuum', '?')}.", "",
           f"Each size is a fresh database pre-grown with SQL to that many Stripe events (raw bodies at Stripe's "
           f"size, 2 events per payment, with their log rows, delivered webhooks, idempotency keys and ledger rows; "
           f"{s8['bulk_load']}), then `paystream serve` takes processing + succeeded webhooks for new "
           f"PaymentIntents at {s8['steady_rate_per_s']:g}/s for {s8['steady_seconds']:g} s, then a ladder of "
           f"{s8['step_seconds']:g} s steps (clean: no error, within 5% of the rate, ack p99 < "
           f"{s8['p99_bound_ms']:g} ms).", "",
           row("events pre-grown", "ack p50", "ack p99", "zero-error webhooks/s", "vs empty", "database",
               "per million events", "autovacuums while serving"),
           row(*["---"] * 8)]
    for r in s8["results"]:
        d = r["disk"]
        autovacuums = sum(t["autovacuums"] for t in r["autovacuum"].values())
        out.append(row(f"{r['events_pre_grown']:,}", f"{r['steady']['ack_ms'].get('p50')} ms",
                       f"{r['steady']['ack_ms'].get('p99')} ms", r["sustained_zero_error_webhooks_per_s"],
                       r.get("sustained_rate_vs_empty", "–"), mib(d["database_bytes"]),
                       # The empty database's bytes are mostly fixed overhead, not per event.
                       mib(d["database_bytes_per_million_events"]) if r["events_pre_grown"] else "–", autovacuums))
    biggest = max(s8["results"], key=lambda r: r["events_pre_grown"])
    if biggest["events_pre_grown"]:
        d = biggest["disk"]
        out += ["", f"Disk per million events at {biggest['events_pre_grown']:,} (at rest, after VACUUM ANALYZE):", "",
                row("table", "heap", "TOAST", "indexes", "total"), row(*["---"] * 5)]
        per = 1e6 / d["events"]
        for name, t in d["tables"].items():
            if t["total"] > 1 << 20:
                out.append(row(name, *(mib(t[k] * per) for k in ("heap", "toast", "indexes", "total"))))
        out += ["", row("index", "table", "per million events"), row(*["---"] * 3)]
        for name, i in d["indexes"].items():
            if i["bytes"] > 1 << 20:
                out.append(row(name, i["table"], mib(i["per_million_events"])))
    ret = s8.get("retention")
    if ret:
        out += ["", f"Retention in minutes: webhooks at {ret['rate_per_s']:g}/s for {ret['minutes']:g} min on a fresh "
                f"database, Stripe events kept {ret['retain_stripe_events_s']:g} s in partitions of "
                f"{ret['partition_interval_s']:g} s ({ret['errors']} errors, {ret['not_applied']} not applied):", "",
                row("t", "webhooks sent", "stripe_events", "partitions", "transaction_events", "database"),
                row(*["---"] * 6)]
        for r in ret["samples"]:
            out.append(row(f"{r['t_s']:g} s", f"{r['webhooks_sent']:,}", mib(r["stripe_events_bytes"]), r["partitions"],
                           mib(r["transaction_events_bytes"]), mib(r["database_bytes"])))
        if a := ret.get("after_retention"):
            out += ["", f"After retention is reached ({ret['retention_reached_s']:g} s): stripe_events "
                    f"{mib(a['stripe_events_bytes_min'])}–{mib(a['stripe_events_bytes_max'])}, growing "
                    f"{mib(a['stripe_events_growth_bytes_per_min'])}/min against the log's "
                    f"{mib(a['transaction_events_growth_bytes_per_min'])}/min (never pruned)."]
    return [*out, ""]


def main() -> int:
    OUT.mkdir(exist_ok=True)
    lines = ["# paystream benchmarks", "", "Made by `bench/report.py` from the last run of each scenario.", ""]
    any_result = next(iter(sorted(RESULTS.glob("*.json"))), None)
    if any_result is None:
        print("no results: run the scenarios first", file=sys.stderr)
        return 1
    m = json.loads(any_result.read_text()).get("machine", {})
    lines += [f"Machine: {m.get('cpus')} × {m.get('cpu')}, Python {m.get('python')}, PostgreSQL 15 (system), "
              "client and server on the same host.", ""]
    s1s = [d for t in ("sse", "ws") if (d := load(f"s1_waiting_{t}"))]
    storms = [d for w in (1, 2) if (d := load(f"s3_storm_{w}w"))]
    lines += targets(next((d for d in s1s if d["transport"] == "sse"), None), s1s, storms)
    singles = [d for name in ("system_c1", "embedded_c1", "system_c10") if (d := load(f"webhook_to_sse_{name}"))]
    if singles:
        lines += ["## One webhook at a time", "", "A single SSE subscriber per transaction; each webhook is sent "
                  "only after the previous one arrived.", "",
                  row("Postgres", "concurrency", "events", "push p50", "p90", "p99", "max", "ack p50", "lost/dup"),
                  row(*["---"] * 9)]
        for d in singles:
            lines.append(row(d["postgres"], d["concurrency"], d["events"], *lat(d, "webhook_sent_to_sse_received_ms"),
                             f"{d['webhook_ack_ms']['p50']} ms", f"{d['lost']}/{d['duplicated']}"))
        lines.append("")
    if s1s:
        lines += ["## S1 waiting browsers", "",
                  row("subscribers", "transport", "push p50", "p90", "p99", "max", "server hand-off ≤ 5 ms",
                      "ack p50", "RSS/idle conn", "server CPU idle / pushing", "DB xact/s: none waiting / N waiting",
                      "full GCs while pushing", "lost/dup"),
                  row(*["---"] * 13)]
        for s1 in s1s:
            share = s1.get("server_write_to_handoff_share", {}).get("le_5ms")
            lines.append(row(s1["subscribers"], s1["transport"], *lat(s1, "webhook_sent_to_subscriber_received_ms"),
                             "–" if share is None else f"{share:.1%}",
                             f"{s1['webhook_ack_ms']['p50']} ms", f"{s1['server_rss_kb_per_idle_connection']} KB",
                             f"{s1['server_cpu_idle_cores']} / {s1['server_cpu_while_pushing_cores']} cores",
                             f"{s1.get('db_xacts_per_s_before_subscribers')} / {s1.get('db_xacts_per_s_while_waiting')}",
                             gcs(s1), f"{s1['lost']}/{s1['wrong_or_duplicated']}"))
        lines.append("")
    if s5 := load("s5_reads_per_push"):
        lines += reads_per_push(s5)
    if s6 := load("s6_scale_out"):
        lines += scale_out(s6, next((d for d in s1s if d["transport"] == "sse"), None))
    if s7 := load("s7_engines"):
        lines += engines(s7)
    for name in ("s8_storage", "s8_storage_embedded"):
        if s8 := load(name):
            lines += storage(s8)
    if s2 := load("s2_fanout"):
        lines += ["## S2 fan-out", "", row("subscribers", "events", "p50", "p90", "p99", "max", "once, in order"),
                  row(*["---"] * 7),
                  row(s2["subscribers"], s2["events"], *lat(s2, "webhook_sent_to_subscriber_received_ms"),
                      s2["every_event_once_in_order"]), ""]
    if storms:
        lines += ["## S3 webhook storm", "", row("workers", "sustained webhooks/s", "raw Postgres commits/s (1/8/32 writers)",
                                                "share of raw ceiling"), row(*["---"] * 4)]
        for d in storms:
            raw = d["raw_postgres_commits_per_s"]
            lines.append(row(d["workers"], d["sustained_webhooks_per_s"], " / ".join(str(v) for v in raw.values()),
                             d["share_of_raw_ceiling"]))
        lines += ["", "Steps (open-loop; sustained = every answer 200, within 5% of the target rate, ack p99 < 1 s):", "",
                  row("workers", "target/s", "achieved/s", "errors", "ack p50", "ack p99", "sustained"),
                  row(*["---"] * 7)]
        for d in storms:
            for st in d["steps"]:
                lines.append(row(d["workers"], st["target_per_s"], st["achieved_per_s"], st["errors"],
                                 f"{st['ack_ms'].get('p50')} ms", f"{st['ack_ms'].get('p99')} ms", st["sustained"]))
        lines.append("")
    modes = [("paystream_sse", "paystream push (SSE)"), ("server_reread_500ms", "server long-poll re-reading every 500 ms"),
             ("browser_poll_2s", "browser polling every 2 s")]
    s4 = {k: d for k, _ in modes if (d := load(f"s4_{k}"))}
    if s4:
        lines += ["## S4 push against polling", "", row("design", "clients", "p50", "p90", "p99", "max",
                                                        "DB transactions/s while waiting"), row(*["---"] * 7)]
        for key, label in modes:
            if key in s4:
                d = s4[key]
                lines.append(row(label, d["clients"], *lat(d, "latency_ms"), d["db_xact_per_s_while_waiting"]))
        lines.append("")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4.5))
            for key, label in modes:
                samples = sorted(s4.get(key, {}).get("samples_ms", []))
                if samples:
                    ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=label)
            ax.set_xscale("log")
            ax.set_xlabel("webhook sent → browser knows (ms, log scale)")
            ax.set_ylabel("fraction of browsers")
            ax.set_title("Latency CDF: push against polling")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right")
            fig.tight_layout()
            fig.savefig(OUT / "latency_cdf.png", dpi=110)
            lines += ["![latency CDF](latency_cdf.png)", ""]
        except ImportError:
            lines += ["(install matplotlib for the chart)", ""]
    (OUT / "REPORT.md").write_text("\n".join(lines))
    print(OUT / "REPORT.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
