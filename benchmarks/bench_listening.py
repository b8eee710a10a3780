"""Listening-data reading at scale: a generated Last.fm CSV and Spotify history.

Writes ``--plays`` plays (default 10 million) as

- one Last.fm CSV export as lastfm-to-csv writes it (``artist,album,track,date``,
  newest first, no header, dates like ``31 Jan 2021 20:15``), with its first
  page of 200 rows downloaded twice (the duplicates must count once);
- a Spotify Extended Streaming History folder of the same number of rows,
  shaped like the real export: files of 16,000 rows, about 14 MB each
  (``Streaming_History_Audio_<years>_<n>.json``, 4-space indented, every
  field Spotify writes, rows of a file shuffled), the read-me PDF beside
  them — 5 % of the rows podcast episodes and 10 % plays under 30 s, which
  the reader leaves out;

then reads each with :func:`deepsim.listening.read_listens` — the code path
of ``beet deepsim-train --listens`` — in a fresh process and prints rows/s
(rows of the files, whether kept or left out) by wall clock and by the
process's CPU time, and its peak RSS.  Since machines are shared and noisy,
each figure comes with the ratio to a baseline run in the same session on
the same files: ``csv.reader`` over the CSV (no parsing of fields) and
``json.load`` of each Spotify file (no looking at fields).  With
``--compare-stdlib`` the Spotify folder is also read as without msgspec (the
stdlib streaming path).  Last, it times the duplicate removal and
sessioning of the same number of plays alone.

Run::

    .venv/bin/python benchmarks/bench_listening.py                  # 10M plays each
    .venv/bin/python benchmarks/bench_listening.py --plays 1000000  # quicker

On a shared machine, write the files first and hold the timing lock only
while reading them (files already in ``--dir`` are reused)::

    python benchmarks/bench_listening.py --dir /tmp/bl --write-only
    flock /work/notes/timing.lock python benchmarks/bench_listening.py --dir /tmp/bl
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

START = 1_420_070_400  # 2015-01-01
ROWS_PER_SPOTIFY_FILE = 16_000


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss would count the parent's
    memory at fork time in a spawned child)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TreeMeter:
    """CPU seconds and peak resident memory of this process and every process below it
    (the reading workers of ``read_listens`` are the forkserver's children, which
    ``getrusage`` never sees): /proc sampled every 50 ms (the process tree looked up
    every 0.5 s); a process's CPU is its last sample, its memory counts while it lives
    (shared pages once per process: an upper bound; Linux only)."""

    def __init__(self) -> None:
        import threading

        self.cpu: dict[int, float] = {}
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _tree(self) -> list[int]:
        parents: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                parents.setdefault(ppid, []).append(int(name))
        out, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(parents.get(pid, []))
        return out

    def _sample(self, refresh: bool = True) -> None:
        if refresh or not hasattr(self, "_pids"):
            self._pids = self._tree()
        rss = 0.0
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/status") as f:
                    rss += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
            except (OSError, StopIteration):
                continue
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick
        self.peak_mib = max(self.peak_mib, rss)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            self._sample(refresh=n % 10 == 0)

    def __enter__(self) -> TreeMeter:
        self._sample()
        self.base = dict(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.cpu.items())


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def catalogue(n_artists: int = 20_000, per_artist: int = 15) -> list[tuple[str, str, str]]:
    rng = random.Random(1)
    words = [
        "Blue",
        "Night",
        "Echo",
        "Garden",
        "Fire",
        "Static",
        "Velvet",
        "Rain",
        "Motor",
        "Glass",
    ]
    out = []
    for a in range(n_artists):
        artist = f"{rng.choice(words)} {rng.choice(words)} {a}"
        for k in range(per_artist):
            out.append((artist, f"{artist} LP {k % 3}", f"{rng.choice(words)} Song {k}"))
    return out


def play_times(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unix times of n plays in sessions (3-5 min apart, hours between) and their songs."""
    rng = np.random.default_rng(seed)
    gaps = rng.integers(180, 300, n)
    breaks = rng.random(n) < 1 / 12  # sessions of about 12 plays
    gaps[breaks] = rng.integers(3 * 3600, 30 * 3600, int(breaks.sum()))
    times = START + np.cumsum(gaps)
    songs = np.minimum(rng.zipf(1.3, n) - 1, 299_999)
    return times, songs


def write_lastfm_csv(path: Path, n: int) -> None:
    cat = catalogue()
    times, songs = play_times(n, 2)
    rows = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        for i in range(n - 1, -1, -1):
            artist, album, title = cat[songs[i] % len(cat)]
            when = datetime.fromtimestamp(int(times[i]), timezone.utc).strftime("%d %b %Y %H:%M")
            row = (artist, album, title, when)
            if len(rows) < 200:
                rows.append(row)
            w.writerow(row)
            if i == n - 200:  # lastfm-to-csv fetched page 1 twice
                w.writerows(rows)


_SPOTIFY_ROW = """    {
        "ts": "%s",
        "platform": "android",
        "ms_played": %d,
        "conn_country": "DE",
        "ip_addr": "192.0.2.44",
        "master_metadata_track_name": %s,
        "master_metadata_album_artist_name": %s,
        "master_metadata_album_album_name": %s,
        "spotify_track_uri": %s,
        "episode_name": %s,
        "episode_show_name": %s,
        "spotify_episode_uri": %s,
        "audiobook_title": null,
        "audiobook_uri": null,
        "audiobook_chapter_uri": null,
        "audiobook_chapter_title": null,
        "reason_start": "trackdone",
        "reason_end": "%s",
        "shuffle": false,
        "skipped": %s,
        "offline": false,
        "offline_timestamp": null,
        "incognito_mode": false
    }"""


def spotify_row(artist: str, album: str, title: str, t: int, kind: float) -> str:
    """One row of Spotify's Extended Streaming History, as Spotify writes it (4-space indent)."""
    episode = kind < 0.05
    short = 0.05 <= kind < 0.15
    q = json.dumps
    return _SPOTIFY_ROW % (
        datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        1_500_000 if episode else 4_000 if short else 214_000,
        "null" if episode else q(title, ensure_ascii=False),
        "null" if episode else q(artist, ensure_ascii=False),
        "null" if episode else q(album, ensure_ascii=False),
        "null" if episode else '"spotify:track:6rqhFgbbKwnb9MLmUQDhG6"',
        '"Episode 12"' if episode else "null",
        '"A Show"' if episode else "null",
        '"spotify:episode:5m8Wv4fyb2eB2XbFv8W1iv"' if episode else "null",
        "fwdbtn" if short else "trackdone",
        "true" if short else "false",
    )


def write_spotify(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    cat = catalogue()
    times, songs = play_times(n, 3)
    kinds = np.random.default_rng(4).random(n)
    shuffle = random.Random(7).shuffle
    for part, lo in enumerate(range(0, n, ROWS_PER_SPOTIFY_FILE)):
        hi = min(n, lo + ROWS_PER_SPOTIFY_FILE)
        rows = [
            spotify_row(*cat[songs[i] % len(cat)], int(times[i]), float(kinds[i]))
            for i in range(lo, hi)
        ]
        shuffle(rows)  # Spotify's files are not in time order
        y0, y1 = (datetime.fromtimestamp(int(times[i]), timezone.utc).year for i in (lo, hi - 1))
        years = f"{y0}" if y0 == y1 else f"{y0}-{y1}"
        name = folder / f"Streaming_History_Audio_{years}_{part}.json"
        name.write_text("[\n" + ",\n".join(rows) + "\n]", encoding="utf-8")
    (folder / "ReadMeFirst_ExtendedStreamingHistory.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")


def _read(path: str, stdlib: bool, q: mp.Queue, tree: str = "") -> None:
    if tree:  # the deepsim of another checkout (--against)
        import sys

        sys.path.insert(0, tree)
    from deepsim.listening import jsonformats, jsonstream, read_listens

    if tree:
        assert jsonformats.__file__.startswith(tree), jsonformats.__file__

    if stdlib:  # as without msgspec: every file through the stdlib streaming path
        jsonformats._SPOTIFY_ROWS._decoder = None
    with TreeMeter() as meter:  # the reading workers too
        t = time.perf_counter()
        listens = read_listens(path)
        dt = time.perf_counter() - t
    fast = jsonstream.msgspec is not None and not stdlib
    kept = (listens.n_plays, listens.duplicates, listens.n_users, listens.n_tracks)
    rss = max(peak_rss_mib(), meter.peak_mib)
    q.put((dt, meter.cpu_seconds, kept, rss, fast))


def _baseline(path: str, stdlib: bool, q: mp.Queue) -> None:
    t, c = time.perf_counter(), time.process_time()
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.glob("*.json")):
            with open(f, encoding="utf-8") as fh:
                json.load(fh)
    else:
        with open(p, encoding="utf-8", newline="") as fh:
            for _ in csv.reader(fh):
                pass
    q.put((time.perf_counter() - t, time.process_time() - c, peak_rss_mib()))


def in_child(target, path: Path, stdlib: bool = False, tree: str = "") -> tuple:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (str(path), stdlib, q, tree) if tree else (str(path), stdlib, q)
    proc = ctx.Process(target=target, args=args)
    proc.start()
    out = q.get()
    proc.join()
    return out


def report(name: str, rows: int, base: tuple, read: tuple, what: str) -> None:
    """One reading's figures, each with its ratio to the baseline of the same run."""
    base_s, base_cpu, _ = base
    dt, dc, (plays, duplicates, sessions, tracks), rss, fast = read
    print(
        f"  {name}: {dt:.1f} s wall, {dc:.1f} s CPU -> {rows / dt:,.0f} rows/s "
        f"({rows / dc:,.0f} rows/s of CPU); peak RSS {rss:.0f} MiB"
        + ("  [JSON by msgspec]" if fast and what == "json.load" else "")
    )
    print(
        f"    kept {plays:,} plays ({duplicates:,} duplicates counted once), "
        f"{sessions:,} sessions, {tracks:,} tracks"
    )
    print(
        f"    = {base_s / dt:.2f}x the speed of {what} alone by wall clock, "
        f"{base_cpu / dc:.2f}x by CPU time"
    )


def bench_build(n: int) -> None:
    """Duplicate removal + sessions of n plays alone (Builder.build): 100 listeners'
    histories (sessions of about 12 plays) in random order, 1 % exact duplicates."""
    from deepsim.listening.core import Builder

    rng = np.random.default_rng(5)
    b = Builder()
    for u in range(100):
        b.user(f"listener{u}")
    for j in range(300_000):
        b.track(f"t{j}")
    times, songs = play_times(n, 6)
    users = np.repeat(np.arange(100, dtype=np.int32), -(-n // 100))[:n]  # one span each
    order = rng.permutation(n)  # read in no particular order
    users, times, songs = users[order], times[order].astype(np.float64), songs[order]
    tracks = songs.astype(np.int32)
    k = n // 100
    users[:k], times[:k], tracks[:k] = users[k : 2 * k], times[k : 2 * k], tracks[k : 2 * k]
    b.play_user.frombytes(users.tobytes())
    b.play_track.frombytes(tracks.tobytes())
    b.play_time.frombytes(times.tobytes())
    del users, tracks, times, songs
    rss0 = current_rss_mib()
    reset_peak_rss()  # the peak so far was the generation's
    t = time.perf_counter()
    listens = b.build(session_gap=1800, min_user_plays=1)
    dt = time.perf_counter() - t
    print(
        f"dedupe + sessions of {n:,} plays alone: {dt:.1f} s ({n / dt:,.0f} plays/s), "
        f"{listens.duplicates:,} duplicates dropped, {listens.n_users:,} sessions; "
        f"peak RSS {peak_rss_mib() - rss0:.0f} MiB above the {rss0:.0f} MiB before "
        f"(which hold the {16 * n / 2**20:.0f} MiB of play arrays)"
    )


def against(path: Path, tree: str, rounds: int) -> None:
    """This checkout's reader against another checkout's, interleaved, CPU time."""
    cpu: dict[str, list[float]] = {"this": [], "other": []}
    for r in range(rounds):
        for who in ("this", "other") if r % 2 == 0 else ("other", "this"):
            _, dc, kept, _, _ = in_child(_read, path, False, tree if who == "other" else "")
            cpu[who].append(dc)
            print(f"  {who:5} round {r + 1}: {dc:.2f} s CPU, kept {kept[0]:,} plays")
    a, b = min(cpu["this"]), min(cpu["other"])
    print(
        f"  best of {rounds}: this checkout {a:.2f} s CPU, {tree} {b:.2f} s CPU "
        f"-> this is {b / a:.2f}x its speed"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--plays", type=int, default=10_000_000)
    ap.add_argument(
        "--dir",
        default=None,
        help="where the files go, kept and reused by later runs (default: a temp dir, removed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument(
        "--write-only", action="store_true", help="write the files into --dir (kept), time nothing"
    )
    ap.add_argument(
        "--compare-stdlib",
        action="store_true",
        help="also read the Spotify folder through the stdlib path (as without msgspec)",
    )
    ap.add_argument(
        "--against",
        metavar="DIR",
        help="also read the Spotify folder with the deepsim of the checkout DIR (e.g. made by "
        "`git worktree add /tmp/old main~3`), this checkout and DIR alternating, --rounds each; "
        "prints the CPU-time ratio",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --against (default 3)")
    ap.add_argument(
        "--only",
        choices=("lastfm-csv", "spotify-extended", "build"),
        action="append",
        help="run only these parts (repeatable; default: all)",
    )
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_listening_"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"(1 min), {os.getloadavg()[2]:.1f} (15 min); {args.plays:,} rows a format"
    )
    print(
        "each reading runs in a fresh process; rows/s counts every row of the files; "
        "'x the speed of' compares with the bare parser on the same files, same run"
    )
    try:
        parts = args.only or ["lastfm-csv", "spotify-extended", "build"]
        for name, write in (
            ("lastfm-csv", lambda p: write_lastfm_csv(p, args.plays)),
            ("spotify-extended", lambda p: write_spotify(p, args.plays)),
        ):
            if name not in parts:
                continue
            path = root / (
                "scrobbles.csv" if name == "lastfm-csv" else "Spotify Extended Streaming History"
            )
            t = time.perf_counter()
            done = path.parent / (path.name + f".{args.plays}.done")
            reused = done.exists()
            if not reused:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                write(path)
                done.touch()
            files = sorted(path.glob("*.json")) if path.is_dir() else [path]
            size = sum(f.stat().st_size for f in files)
            print(
                f"{name}: {'reused' if reused else 'wrote'} {args.plays:,} rows in "
                f"{len(files):,} file(s), {size / 2**20:,.0f} MiB "
                f"({size / len(files) / 2**20:.1f} MiB a file)"
                + ("" if reused else f" in {time.perf_counter() - t:.0f} s")
            )
            if args.write_only:
                continue
            what = "csv.reader" if name == "lastfm-csv" else "json.load"
            base = in_child(_baseline, path)
            print(
                f"  baseline, {what} alone: {base[0]:.1f} s wall, {base[1]:.1f} s CPU -> "
                f"{args.plays / base[0]:,.0f} rows/s; peak RSS {base[2]:.0f} MiB"
            )
            report("read_listens", args.plays, base, in_child(_read, path), what)
            if name == "spotify-extended" and args.compare_stdlib:
                report(
                    "read_listens, stdlib JSON (as without msgspec)",
                    args.plays,
                    base,
                    in_child(_read, path, True),
                    what,
                )
            if name == "spotify-extended" and args.against:
                against(path, str(Path(args.against).resolve()), args.rounds)
            if not args.keep and not args.dir:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if "build" in parts and not args.write_only:
            bench_build(args.plays)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
