"""pixcon.progress: what a long run prints when stderr is a log file, not a terminal."""
import io

from pixcon import progress as P


class _Log(io.StringIO):
    def isatty(self):
        return False


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _clock(monkeypatch, t):
    monkeypatch.setattr(P.time, "time", lambda: t[0])


def test_log_lines_every_30_seconds_with_rate_and_eta(monkeypatch):
    t = [1000.0]
    _clock(monkeypatch, t)
    log = _Log()
    bar = P.Progress(1000, "semi+reco", stream=log)
    bar.update(0)
    for n in range(1, 41):             # 40 steps of 2 s: 4% done, 80 s elapsed
        t[0] += 2.0
        bar.update(n, "loss 1.0")
    lines = log.getvalue().splitlines()
    # no 10% boundary crossed: the lines come from the 30 s rule (at 30 s and 60 s)
    assert len(lines) == 2, lines
    assert lines[0] == "semi+reco 15/1000 loss 1.0 0.50/s, 30s elapsed, eta 1970s"
    assert lines[1] == "semi+reco 30/1000 loss 1.0 0.50/s, 60s elapsed, eta 1940s"


def test_log_lines_at_every_tenth_and_resume_rate(monkeypatch):
    t = [0.0]
    _clock(monkeypatch, t)
    log = _Log()
    bar = P.Progress(100, "run", stream=log)
    bar.update(50)                     # resumed at step 50: the rate counts only this run's steps
    for n in range(51, 101):
        t[0] += 0.1
        bar.update(n)
    lines = log.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["60/100", "70/100", "80/100", "90/100", "100/100"]
    assert lines[-1] == "run 100/100  10/s, 5s elapsed, eta 0s"


def test_terminal_line_is_redrawn_in_place(monkeypatch):
    t = [0.0]
    _clock(monkeypatch, t)
    tty = _Tty()
    bar = P.Progress(4, "bench", stream=tty)
    for n in range(1, 5):
        t[0] += 1.0
        bar.update(n)
    bar.close()
    out = tty.getvalue()
    assert out.count("\r") == 4 and out.endswith("\n")
    assert "[####################] 4/4" in out and "eta 0s" in out


def test_disabled_prints_nothing(monkeypatch):
    log = _Log()
    bar = P.Progress(10, "x", enabled=False, stream=log)
    for n in range(11):
        bar.update(n)
    bar.close()
    assert log.getvalue() == ""
