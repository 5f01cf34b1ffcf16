"""opslib.batch.update_in_batches against one set-based UPDATE and the guide's LIMIT/OFFSET loop; printed as ratios.

On a generated table ``items (id bigint PRIMARY KEY, price text, amount numeric)`` of ROWS rows (default
2,000,000; prices are text decimals, amount is NULL), each measurement on a fresh copy of the data (a new
database made from a loaded, VACUUM ANALYZEd template, so no side pays for another's dead tuples), then
VACUUM ANALYZE and CHECKPOINT (untimed); the connection is opened untimed; medians of REPEATS:

  UPDATE items SET amount = CAST(price AS numeric)                  the bare tool: one statement, one commit
  update_in_batches("items", "amount = CAST(price AS numeric)")   key ranges of batch_rows (default 10,000)
      throughput against the single UPDATE                          goal >= 0.9
      time on ROWS rows / time on ROWS/2 rows (its own template)     goal <= 2.2
      the longest time one range held its row locks, against the single UPDATE's (its whole duration)
  the guide's loop: SELECT id, price FROM items LIMIT 1000 OFFSET n, then one
      UPDATE items SET amount = :v WHERE id = :id per row (Decimal(price) in Python), one commit at the end,
      on the first 10k, 20k, 40k, 80k rows (--guide-sizes); scaled to ROWS by part: the per-row UPDATEs
      linearly, and the SELECTs page by page from one page's cost measured at offsets across the whole table
      (the OFFSET scans grow as n^2 in all); a plain fit t = a*n + b*n^2 over the subsets is shown as well.

The server is DATABASE_URL's (scratch databases are created and dropped on it), else the embedded one.

  python benchmarks/bench_batch.py [--rows N] [--repeats N] [--guide-sizes 10000,20000,40000,80000]
                                   [--sweep 5000,20000,50000]   (batch_rows values also timed on ROWS rows)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg2
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import db  # noqa: E402
from opslib.batch import DEFAULT_BATCH_ROWS, update_in_batches  # noqa: E402
from opslib.config import load_settings  # noqa: E402

REPEATS = 3
GUIDE_SIZES = "10000,20000,40000,80000"
GUIDE_PAGE = 1000  # the guide's LIMIT
SET_SQL = "amount = CAST(price AS numeric)"
SINGLE = sa.text(f"UPDATE items SET {SET_SQL}")
GUIDE_SELECT = sa.text(f"SELECT id, price FROM items LIMIT {GUIDE_PAGE} OFFSET :offset")
GUIDE_UPDATE = sa.text("UPDATE items SET amount = :v WHERE id = :id")


class Server:
    """The server, its admin connection, and the scratch databases made on it (all dropped by close)."""

    def __init__(self, url) -> None:
        self.url = url
        self.admin = psycopg2.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
        self.admin.autocommit = True
        self.cur = self.admin.cursor()
        self.major = self.admin.server_version // 10000
        self.made: list[str] = []

    def create(self, template: str | None = None) -> str:
        name = f"opslib_bench_b{uuid.uuid4().hex[:8]}"
        self.made.append(name)
        # FILE_COPY: the copy is written once, not through the WAL (the default from PostgreSQL 15 on).
        copy = (
            f' TEMPLATE "{template}"' + (" STRATEGY FILE_COPY" if self.major >= 15 else "")
            if template
            else ""
        )
        self.cur.execute(f'CREATE DATABASE "{name}"{copy}')
        return name

    def drop(self, name: str) -> None:
        self.cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.remove(name)

    def engine(self, name: str) -> sa.Engine:
        return db.make_engine(self.url.set(database=name))

    def close(self) -> None:
        for name in list(self.made):
            self.drop(name)
        self.admin.close()


def _template(server: Server, rows: int) -> str:
    """A database holding ``items`` with ``rows`` rows, vacuumed and analyzed: the source of every copy."""
    name = server.create()
    engine = server.engine(name)
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE items (id bigint PRIMARY KEY, price text, amount numeric)"))
        conn.execute(
            sa.text(
                "INSERT INTO items SELECT g, (g % 100000)::text || '.' || lpad((g % 100)::text, 2, '0'), NULL "
                "FROM generate_series(1, :n) g"
            ),
            {"n": rows},
        )
        conn.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE items"))
    engine.dispose()
    return name


class Copy:
    """A fresh copy of a template, vacuumed, analyzed and checkpointed (untimed), with one open connection."""

    def __init__(self, server: Server, template: str) -> None:
        self.server = server
        self.name = server.create(template)
        self.engine = server.engine(self.name)

    def __enter__(self) -> sa.Connection:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE items"))
        self.server.cur.execute("CHECKPOINT")  # no dirty buffers left by the load or the measurement before
        # Not in a transaction (as update_in_batches needs): SQLAlchemy begins one on the first statement.
        self.conn = self.engine.connect()
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()
        self.engine.dispose()
        self.server.drop(self.name)

    def count(self, sql: str, **params) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(sql), params).scalar())


def single_update(server: Server, template: str, rows: int) -> float:
    """Seconds of one UPDATE of every row and its commit."""
    copy = Copy(server, template)
    with copy as conn:
        start = time.perf_counter()
        done = conn.execute(SINGLE).rowcount
        conn.commit()
        seconds = time.perf_counter() - start
    assert done == rows, f"the single UPDATE changed {done} rows, not {rows}"
    return seconds


def batched(server: Server, template: str, rows: int, batch_rows: int | None = None):
    """Seconds of update_in_batches on every row (wall, the call as a revision makes it), and its result."""
    copy = Copy(server, template)
    options = {} if batch_rows is None else {"batch_rows": batch_rows}
    with copy as conn:
        start = time.perf_counter()
        result = update_in_batches("items", SET_SQL, connection=conn, progress=False, **options)
        seconds = time.perf_counter() - start
        left = copy.count("SELECT count(*) FROM items WHERE amount IS DISTINCT FROM CAST(price AS numeric)")
    assert result.rows == rows and left == 0, (
        f"update_in_batches: {result.rows} rows, {left} left unconverted"
    )
    return seconds, result


def guide_loop(server: Server, template: str, n: int) -> tuple[float, float, int]:
    """The guide's loop over the first ``n`` rows (OFFSET 0 … n-1000), one commit at the end:
    (seconds, of which in the SELECTs, distinct ids <= n that it converted)."""
    copy = Copy(server, template)
    with copy as conn:
        selecting = 0.0
        start = time.perf_counter()
        for offset in range(0, n, GUIDE_PAGE):
            began = time.perf_counter()
            page = conn.execute(GUIDE_SELECT, {"offset": offset}).all()
            selecting += time.perf_counter() - began
            for row_id, price in page:
                conn.execute(GUIDE_UPDATE, {"v": Decimal(price), "id": row_id})
        conn.commit()
        seconds = time.perf_counter() - start
        covered = copy.count("SELECT count(*) FROM items WHERE id <= :n AND amount IS NOT NULL", n=n)
    return seconds, selecting, covered


def offset_scan(server: Server, template: str, rows: int, samples: int = 6) -> list[tuple[int, float]]:
    """Seconds of the guide's SELECT (LIMIT 1000) at offsets spread over the whole table, best of 3 each:
    what each of its pages costs as the offset grows, measured where the loop would reach it."""
    copy = Copy(server, template)
    points = []
    with copy as conn:
        for i in range(samples):
            offset = (rows - GUIDE_PAGE) * i // (samples - 1)
            best = float("inf")
            for _ in range(3):
                began = time.perf_counter()
                conn.execute(GUIDE_SELECT, {"offset": offset}).all()
                best = min(best, time.perf_counter() - began)
            points.append((offset, best))
        conn.rollback()
    return points


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(c0, c1) of the least-squares line t = c0 + c1*x through (x, t)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(t for _, t in points) / n
    c1 = sum((x - mx) * (t - my) for x, t in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - c1 * mx, c1


def fit_quadratic(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares fit t = a*n + b*n^2 (no intercept) through (n, t)."""
    s2 = sum(n**2 for n, _ in points)
    s3 = sum(n**3 for n, _ in points)
    s4 = sum(n**4 for n, _ in points)
    t1 = sum(n * t for n, t in points)
    t2 = sum(n**2 * t for n, t in points)
    det = s2 * s4 - s3 * s3
    return (t1 * s4 - t2 * s3) / det, (s2 * t2 - s3 * t1) / det


def _runs(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _vs(ours: float, guide: float) -> str:
    if guide <= 0:
        return "n/a: the fit extrapolates to a negative time (noise swamps the n^2 term at these sizes)"
    return f"**{ours / guide:.4f}** ({guide / ours:,.0f}x faster)"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(argv: list[str] | None = None) -> int:
    """Build the templates, run every measurement REPEATS times, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the table (default 2,000,000)")
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"repeats of each measurement (default {REPEATS})"
    )
    parser.add_argument(
        "--guide-sizes", default=GUIDE_SIZES, help=f"rows of the guide's loop (default {GUIDE_SIZES})"
    )
    parser.add_argument(
        "--sweep", default="", help="batch_rows values also timed on ROWS rows (default none)"
    )
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.guide_sizes.split(",") if x.strip()})
        sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    except ValueError:
        parser.error("--guide-sizes and --sweep take numbers separated by commas")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if len(sizes) < 2 or min(sizes) < GUIDE_PAGE or max(sizes) > args.rows:
        parser.error(f"--guide-sizes: two sizes or more, each from {GUIDE_PAGE} to --rows")
    rows, half = args.rows, args.rows // 2

    server = Server(db.target_url(load_settings()).set(database="postgres"))
    t: dict[str, list[float]] = {"single": [], "batch": [], "half": [], "longest": []}
    batches = 0
    guide: dict[int, list[tuple[float, float, int]]] = {n: [] for n in sizes}
    swept: dict[int, list[float]] = {b: [] for b in sweep}
    scans: list[tuple[int, float]] = []
    try:
        full_src, half_src = _template(server, rows), _template(server, half)
        with server.engine(full_src).connect() as conn:
            version, _ = db.server_version(conn)
            size = conn.execute(sa.text("SELECT pg_size_pretty(pg_total_relation_size('items'))")).scalar()
            shared = conn.execute(sa.text("SHOW shared_buffers")).scalar()
        for _ in range(args.repeats):
            t["single"].append(single_update(server, full_src, rows))
            seconds, result = batched(server, full_src, rows)
            t["batch"].append(seconds)
            t["longest"].append(result.longest_batch_s)
            batches = result.batches
            t["half"].append(batched(server, half_src, half)[0])
            for n in sizes:
                guide[n].append(guide_loop(server, full_src, n))
            for b in sweep:
                swept[b].append(batched(server, full_src, rows, b)[0])
        scans = offset_scan(server, full_src, rows)
    finally:
        server.close()

    m = {k: statistics.median(v) for k, v in t.items()}
    g = {
        n: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for n, runs in guide.items()
    }
    a, b = fit_quadratic([(n, total) for n, (total, _) in g.items()])
    guide_full = a * rows + b * rows**2
    # By part: the per-row UPDATEs (linear: a_u per row, from the subsets), and the SELECTs summed page by
    # page from their cost measured at offsets over the whole table (a line in the offset: c0 + c1*offset).
    a_u = sum(n * (tot - sel) for n, (tot, sel) in g.items()) / sum(n * n for n in g)
    c0, c1 = fit_line(scans)
    pages = rows // GUIDE_PAGE
    selects = pages * c0 + c1 * GUIDE_PAGE * pages * (pages - 1) / 2
    by_part = a_u * rows + selects
    coverage = {n: min(r[2] for r in runs) for n, runs in guide.items()}

    throughput = m["single"] / m["batch"]  # (rows / batch s) / (rows / single s)
    growth = m["batch"] / m["half"]
    print(
        f"PostgreSQL {version} at {db.redact_url(server.url)}, {os.cpu_count()} cores, shared_buffers {shared}; "
        f"items: {rows:,} rows ({size}); medians of {args.repeats}, each on a fresh copy "
        "(VACUUM ANALYZE and CHECKPOINT untimed before it)"
    )
    print()
    print("| figure | median | runs | goal |")
    print("|---|---|---|---|")
    print(
        f"| single `UPDATE items SET {SET_SQL}`, {rows:,} rows | {m['single']:.2f} s "
        f"({rows / m['single']:,.0f} rows/s) | {_runs(t['single'])} | |"
    )
    print(
        f"| `update_in_batches` (batch_rows {DEFAULT_BATCH_ROWS:,}, {batches} batches), {rows:,} rows | "
        f"{m['batch']:.2f} s ({rows / m['batch']:,.0f} rows/s) | {_runs(t['batch'])} | |"
    )
    print(
        f"| throughput, batches / single UPDATE | **{throughput:.2f}** | | >= 0.9: {_met(throughput >= 0.9)} |"
    )
    print(f"| `update_in_batches`, {half:,} rows | {m['half']:.2f} s | {_runs(t['half'])} | |")
    print(f"| time({rows:,}) / time({half:,}) | **{growth:.2f}** | | <= 2.2: {_met(growth <= 2.2)} |")
    print(
        f"| longest row-lock hold: one batch (longest_batch_s) | {m['longest']:.3f} s | "
        f"{_runs(t['longest'], 3)} | |"
    )
    print(f"| longest row-lock hold: the single UPDATE (its whole duration) | {m['single']:.2f} s | | |")
    print(f"| lock hold, batch / single | {m['longest'] / m['single']:.4f} | | |")
    for n, (total, sel) in g.items():
        print(
            f"| guide's loop, first {n:,} rows (of which SELECTs) | {total:.2f} s ({sel:.2f} s) | "
            f"{_runs([r[0] for r in guide[n]])} | |"
        )
    print(f"| guide's loop, fitted a (s/row), b (s/row^2) | a = {a:.3e}, b = {b:.3e} | | |")
    print(f"| guide's loop, extrapolated to {rows:,} rows | {guide_full:,.0f} s | | |")
    print(f"| time, `update_in_batches` / guide's loop at {rows:,} | {_vs(m['batch'], guide_full)} | | |")
    print(f"| guide's loop at {rows:,}, by part (below) | {by_part:,.0f} s | | |")
    print(f"| time, `update_in_batches` / guide's loop, by part | {_vs(m['batch'], by_part)} | | |")
    for bsize, values in swept.items():
        sm = statistics.median(values)
        print(
            f"| sweep: batch_rows {bsize:,}, {rows:,} rows | {sm:.2f} s, throughput vs single "
            f"{m['single'] / sm:.2f} | {_runs(values)} | >= 0.9: {_met(m['single'] / sm >= 0.9)} |"
        )
    print()
    print(
        f"How the guide's loop was scaled: it ran on the first n rows of the {rows:,}-row table (OFFSET 0, "
        f"{GUIDE_PAGE}, ... n-{GUIDE_PAGE}; one UPDATE per row; one commit) for n = "
        f"{', '.join(f'{n:,}' for n in sizes)}; the medians were fitted by least squares to t = a*n + b*n^2 (no "
        f"intercept), and t({rows:,}) = a*{rows:,} + b*{rows:,}^2 = {a * rows:,.0f} s (round trips) + "
        f"{b * rows**2:,.0f} s (OFFSET scans)."
    )
    print(
        f"By part, the better-founded figure: the per-row UPDATEs cost a_u = {a_u * 1e6:.1f} µs each (from the "
        f"subsets' times less their SELECTs): {a_u * rows:,.0f} s for {rows:,} rows; one page's SELECT, measured at "
        f"offsets {', '.join(f'{x:,}' for x, _ in scans)} on the full table, costs {c0 * 1e3:.2f} ms + "
        f"{c1 * 1e9:.1f} ns per row skipped, so the {pages:,} pages cost {selects:,.0f} s in all (quadratic: "
        f"the k-th page skips k*{GUIDE_PAGE} rows); total {by_part:,.0f} s."
    )
    top = max(sizes)
    if b <= 0 or b * top**2 > 2 * g[top][1]:
        print(
            f"Caution: at n = {top:,} the total fit's n^2 term is {b * top**2:.2f} s, while all of that run's "
            f"SELECTs (where the OFFSET cost is) took {g[top][1]:.2f} s: the total fit's b reflects noise in the "
            "per-row round trips, not the OFFSET scans; read the by-part figure."
        )
    missed = {n: n - c for n, c in coverage.items() if c < n}
    if missed:
        print(
            "Note: the guide's loop has no ORDER BY and commits once, so each page it updates moves behind the scan "
            "(its new row versions go to the end of the table, the old ones are no longer visible to it) and the "
            "next OFFSET skips a page: of the first n ids it left "
            + ", ".join(f"{left:,} of {n:,}" for n, left in missed.items())
            + " unconverted (it converts rows further on instead). Timed as written."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
