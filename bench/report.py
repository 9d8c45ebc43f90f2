"""Turns a run's results (what bench/run.py writes to latest.json) into the printed tables.

One table per figure; each row has the three servers side by side and the
ratios between them (meshgate/Nchan, meshgate/baseline, Nchan/baseline), so
that a figure is always read against servers measured in the same run.
"""

SERVERS = [("meshgate", "meshgate"), ("nchan", "Nchan"), ("baseline", "baseline")]
RATIOS = [("meshgate", "nchan"), ("meshgate", "baseline"), ("nchan", "baseline")]
LABEL = dict(SERVERS)


def header(machine: dict) -> str:
    return "\n".join([
        "meshgate benchmark: meshgate, Nchan and a websockets baseline, one load generator, loopback",
        f"  machine:  {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, open-file limit {machine['nofile_limit']:,}",
        f"  software: Python {machine['python']}, nginx {machine['nginx']}, nchan {machine['nchan']}, "
        f"websockets {machine['websockets']}",
        f"  meshgate: commit {machine['meshgate_commit']}",
        "",
    ])


def _dig(data, path: str):
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _render(title: str, head: list, rows: list, notes=()) -> str:
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    line = lambda row: "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                                 for i, (cell, width) in enumerate(zip(row, widths)))
    out = [title, line(head), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    out += [f"  {note}" for note in notes]
    return "\n".join(out)


def _ratio(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}"
    return "-"


def figure(results: dict, title: str, rows: list, fmt, ratios: bool = True) -> str:
    """`rows`: (row label, path into each server's results); `fmt` renders one value."""
    present = [(name, label) for name, label in SERVERS if name in results["servers"]]
    pairs = [(a, b) for a, b in RATIOS if a in results["servers"] and b in results["servers"]] if ratios else []
    head = [""] + [label for _, label in present] + [f"{LABEL[a]}/{LABEL[b]}" for a, b in pairs]
    table, notes = [], []
    for row_label, path in rows:
        values, cells = {}, [row_label]
        for name, label in present:
            holder_path, _, leaf = path.rpartition(".")
            holder = _dig(results["servers"][name], holder_path) if holder_path else results["servers"][name]
            value = _dig(holder, leaf) if holder is not None else None
            values[name] = value
            if isinstance(holder, dict) and holder.get("error"):
                cells.append("failed")
                notes.append(f"{label}, {row_label}: {holder['error'][:160]}")
            elif value is None:
                cells.append("-")
            else:
                cell = fmt(value)
                if isinstance(holder, dict) and holder.get("note"):
                    cell += "*"
                    note = f"* {label}, {row_label}: {holder['note']}"
                    if note not in notes:
                        notes.append(note)
                cells.append(cell)
        cells += [_ratio(values[a], values[b]) for a, b in pairs]
        table.append(cells)
    return _render(title, head, table, notes)


def _fanout_rows(results: dict, leaf: str) -> list:
    counts = []
    for server in results["servers"].values():
        for count in server.get("fanout", {}):
            if count not in counts:
                counts.append(count)
    return [(f"{int(count):,} subscribers", f"fanout.{count}.{leaf}") for count in sorted(counts, key=int)]


def _cpu_breakdown(parts: dict) -> str:
    shown = [f"{name} {seconds:.2f}" for name, seconds in sorted(parts.items()) if seconds >= 0.05]
    return ", ".join(shown) or "-"


def tables(results: dict) -> str:
    integer = lambda value: f"{value:,.0f}"
    ms = lambda value: f"{value:.1f}"
    kib = lambda value: f"{value:.2f}"
    out = [
        figure(results, "Fan-out deliveries per second (K subscribers x M messages / time until every "
                        "subscriber has every message; higher is better)",
               _fanout_rows(results, "deliveries_per_s"), integer),
        figure(results, "Fan-out completion time of one publish at idle, median of 20, ms (POST to the last "
                        "subscriber's arrival; lower is better)",
               _fanout_rows(results, "idle_fanout.median_ms"), ms),
        figure(results, "Fan-out completion time of one publish at idle, p99 of 20 (= the slowest), ms",
               _fanout_rows(results, "idle_fanout.p99_ms"), ms),
        figure(results, "Publish requests per second, 100 subscribers, 4 keep-alive HTTP connections "
                        "(higher is better)",
               [("100 subscribers", "rounds_100.publish.requests_per_s")], integer),
        figure(results, "... the same publishes, counted until every subscriber had every one (first POST to "
                        "the last subscriber's last message; higher is better)",
               [("100 subscribers", "rounds_100.publish.delivered_per_s")], integer),
        figure(results, "Memory per idle connection, KiB (RSS growth of all the server's processes / K; "
                        "lower is better)",
               _fanout_rows(results, "kib_per_connection_rss"), kib),
        figure(results, "Memory per idle connection, KiB (the same with PSS: shared pages counted once)",
               _fanout_rows(results, "kib_per_connection_pss"), kib),
        figure(results, "CPU seconds of the server's processes during the fan-out (same M for every server; "
                        "lower is better)",
               _fanout_rows(results, "cpu_total_s"), lambda v: f"{v:.2f}"),
        figure(results, "... per process (seconds; processes under 0.05 s left out)",
               _fanout_rows(results, "cpu_s"), _cpu_breakdown, ratios=False),
        figure(results, "Load generator CPU seconds during the fan-out (receivers + publisher, sharing the "
                        "cores with the server)",
               _fanout_rows(results, "loadgen_cpu_s"), lambda v: f"{v:.2f}"),
        figure(results, "CPU seconds other processes of the machine used during the fan-out (not part of the "
                        "bench; a shared machine makes every figure noisier)",
               _fanout_rows(results, "background_cpu_s"), lambda v: f"{v:.2f}", ratios=False),
        figure(results, "WebSocket handshakes per second (connect, upgrade, close; 16 connectors; higher "
                        "is better)",
               [("100 subscribers idle", "rounds_100.handshakes.per_s")], integer),
        figure(results, "Delivery ratio (messages received / expected; 1.0000 = nothing lost)",
               [(f"fan-out, {label}", path) for label, path in _fanout_rows(results, "delivery_ratio")]
               + [(f"idle probes, {label}", path) for label, path in _fanout_rows(results, "idle_fanout.delivery_ratio")]
               + [("publish round, 100 subscribers", "rounds_100.publish.delivery_ratio")],
               lambda v: f"{v:.4f}", ratios=False),
        reported_failures(results),
        meshgate_api(results),
        "\n".join(f"{LABEL[name]} was skipped: {why}" for name, why in results.get("skipped", {}).items()),
    ]
    return "\n\n".join(table for table in out if table)


def meshgate_api(results: dict) -> str:
    rounds = _dig(results, "servers.meshgate.rounds_100")
    if not rounds:
        return ""
    if rounds.get("error"):
        return f"meshgate API figures: round failed: {rounds['error']}"
    rows = []
    for key, label, rate in [
            ("ws_send_local", "/ws/v1 mesh.send, pipelined, one connection, client on the same node", "requests_per_s"),
            ("ws_send_cross_node", "/ws/v1 mesh.send, pipelined, one connection, client on the other node",
             "requests_per_s"),
            ("http_send", "HTTP /v1/mesh/send, 4 keep-alive connections", "requests_per_s"),
            ("queue_events", "queue events from 100 clients to one queue.pop consumer (median of rounds)",
             "events_per_s")]:
        item = rounds.get(key) or {}
        ratio, each = item.get("delivery_ratio"), item.get("cpu_us_each")
        rows.append([label, f"{item[rate]:,.0f}" if rate in item else "-",
                     f"{each:,.1f}" if isinstance(each, (int, float)) else "-",
                     f"{ratio:.4f}" if isinstance(ratio, float) else "-"])
    return _render("meshgate only: API and queue figures (per second, higher is better; server CPU per request "
                   "or event, all its processes, lower is better)",
                   ["", "per second", "CPU µs each", "delivery ratio"], rows)


def reported_failures(results: dict) -> str:
    """What the servers themselves said went wrong during the fan-out rounds, where anything did:
    meshgate's publish replies count in `f` the subscribers of a peer that did not answer within
    node.forward_timeout, whether or not the peer then delivered; and messages that came very late."""
    lines = []
    for name, label in SERVERS:
        for count, round_ in sorted((_dig(results, f"servers.{name}.fanout") or {}).items(), key=lambda i: int(i[0])):
            if not isinstance(round_, dict) or round_.get("error"):
                continue
            failed, late = round_.get("failures_reported_by_server") or 0, round_.get("late_deliveries") or 0
            health = round_.get("server_health") or {}
            if failed or late or any(health.values()):
                counters = ", ".join(f"{key} {value}" for key, value in health.items() if value)
                lines.append(f"  {label}, {int(count):,} subscribers: publish replies reported {failed:,} failed "
                             f"deliveries; {late:,} deliveries came over 15 s late"
                             + (f"; server counters: {counters}" if counters else ""))
    if not lines:
        return ""
    return "\n".join(["What the servers reported during the fan-out rounds", *lines])
