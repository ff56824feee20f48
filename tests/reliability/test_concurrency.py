"""Two optimized denoisers sharing one model keep separate caches (interleaved runs give their solo results); one
optimized denoiser used from two threads is refused with an error saying what to do; one per thread works."""

from __future__ import annotations

import threading

import torch
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from reliability.helpers import PROMPTS, Forwarding


def _two(dit, sampler, prof):
    a = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.TaylorSeer(interval=2, warmup=2), profile=prof,
                         progress=False)
    b = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.FORA(interval=2), profile=prof, progress=False)
    return a, b


def test_two_optimized_denoisers_sharing_one_model_interleave_correctly(dit, sampler, prof):
    a, b = _two(dit, sampler, prof)
    want_a, want_b = seeded_run(a, sampler, 3), seeded_run(b, sampler, 4)
    a.reset(), b.reset()
    got = _alternating(sampler, [(a, 3), (b, 4)])
    assert torch.equal(got[0], want_a) and torch.equal(got[1], want_b)


def _alternating(sampler, loops):
    """Run the loops in threads that take strict turns: one denoiser call each, in order — the calls of the runs
    interleave exactly (each thread keeps to its own denoiser)."""
    turn = threading.Condition()
    state = {"turn": 0, "done": set()}
    outs = [None] * len(loops)
    ready = [threading.Event() for _ in loops]  # a loop drew its noise (torch's global generator) and waits

    def hand_on(i):
        for k in range(1, len(loops) + 1):
            nxt = (i + k) % len(loops)
            if nxt not in state["done"]:
                state["turn"] = nxt
                break
        turn.notify_all()

    def runner(i, den, prompt):
        def call(*args, **kwargs):
            ready[i].set()
            with turn:
                turn.wait_for(lambda: state["turn"] == i)
                out = den(*args, **kwargs)
                hand_on(i)
            return out

        torch.manual_seed(0)
        with torch.no_grad():
            outs[i] = sampler(Forwarding(den, call), prompt)
        with turn:
            state["done"].add(i)
            if state["turn"] == i:
                hand_on(i)

    threads = [threading.Thread(target=runner, args=(i, den, p)) for i, (den, p) in enumerate(loops)]
    for t, r in zip(threads, ready):
        t.start()
        r.wait(60)  # one at a time through the seeded noise draw
    for t in threads:
        t.join(120)
    return outs


def test_one_denoiser_from_two_threads_is_refused(dit, sampler, prof):
    a, _ = _two(dit, sampler, prof)
    started, release = threading.Event(), threading.Event()
    errors = []

    def first():
        calls = {"n": 0}

        def slow(*args, **kwargs):  # pause between the first and the second call of its run
            calls["n"] += 1
            if calls["n"] == 2:
                started.set()
                release.wait(30)
            return a(*args, **kwargs)

        torch.manual_seed(0)
        with torch.no_grad():
            sampler(Forwarding(a, slow), 3)

    def second():
        started.wait(5)
        try:
            seeded_run(a, sampler, 4)
        except fxcache.InputError as e:
            errors.append(str(e))
        finally:
            release.set()

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start(), t2.start()
    t1.join(30), t2.join(30)
    assert errors, "the second thread's use of the same denoiser was not refused"
    assert "another thread" in errors[0] and "give each thread its own" in errors[0]


def test_one_fork_per_thread_works(dit, sampler, prof):
    a, _ = _two(dit, sampler, prof)
    want = seeded_run(a, sampler, 3)
    forks = [a.fork() for _ in range(2)]  # bound already: no tracing in the threads
    assert all(f.traced is a.traced and f._cache is not a._cache for f in forks)
    outs, errors = {}, []

    def worker(i):
        try:
            outs[i] = _own_noise_run(forks[i], sampler, 3)
        except Exception as e:  # noqa: BLE001 — reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for out in outs.values():
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert forks[0].stats() == forks[1].stats() == a.stats()


_SEED_LOCK = threading.Lock()


def _own_noise_run(den, sampler, prompt):
    """``seeded_run`` from a thread: seeding torch's global generator and drawing the initial noise happen under a
    lock released at the first denoiser call; the rest of the run is concurrent with the other threads."""
    held = {"lock": True}

    def call(*args, **kwargs):
        if held["lock"]:
            held["lock"] = False
            _SEED_LOCK.release()
        return den(*args, **kwargs)

    _SEED_LOCK.acquire()
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            return sampler(Forwarding(den, call), prompt)
    finally:
        if held["lock"]:
            _SEED_LOCK.release()

