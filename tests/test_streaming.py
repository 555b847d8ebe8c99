"""Incremental streaming: exact accounting, early first audio, bounded deviation, flat cost."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev.metrics import snr_db
from nightingale.models import dsp, load_model
from nightingale.models.conds import Conditionals, T3Cond
from nightingale.models.s3gen.flow import fixed_noise
from nightingale.models.streaming import (
    ChunkSchedule,
    HiftStream,
    SegmentRenderer,
    StreamOptions,
    TokenPump,
    _T3Thread,
    _prompt,
    guard_runaway,
    render_tokens,
    source_noise,
    source_phase,
    speech_noise,
    stream_text,
    stream_tokens,
    token_budget,
)
from nightingale.models.chunks import Cancelled
from nightingale.models.text import MAX_SEGMENT_CHARS, split_text

VOICED_F0_BIAS_HZ = 150.0  # classifier bias that switches the tiny HiFT's sine source on (as tools/fixtures_hift.py)
# Streamed HiFT windows against one-shot vocoding of the same mel, voiced: 72-104 dB measured
# (float rounding: with OpenBLAS a 1-frame window's F0 rounds differently and its phase is
# carried on). The bound fails for a 12-frame hold-back (57 dB), for a float32 phase sum
# instead of the fixed-point one (41-48 dB), and for the old design that committed each
# window's edge F0 (-0.9 dB).
HIFT_STREAM_SNR_BOUND_DB = 60.0
# Mel of streamed flow windows (3-token lookahead, 24 context tokens) against one-shot flow
# over all tokens, same noise, tiny random weights (which attend over the whole window):
# 17 dB measured; one-shot with other noise gives -1.6 dB and other tokens 4.5 dB.
FLOW_STREAM_MEL_SNR_BOUND_DB = 12.0


@pytest.fixture(scope="module")
def voiced_model(tiny_checkpoint):
    """The tiny model with its F0 classifier biased to ~150 Hz: a voiced vocoder, as trained
    weights are for speech (a separate copy: the shared tiny_model stays unvoiced)."""
    model = load_model(tiny_checkpoint)
    clf = model.s3gen.mel2wav.f0_predictor.classifier
    clf.bias = mx.full(clf.bias.shape, VOICED_F0_BIAS_HZ)
    return model


def _one_shot_vocoding(hift, mel: mx.array, seed: int) -> np.ndarray:
    n_frames, n_harm = mel.shape[2], hift.cfg.nb_harmonics + 1
    src = hift.source(hift.f0(mel), phase=source_phase(seed, n_harm), noise=source_noise(seed, 0, n_frames, n_harm))
    return np.array(dsp.apply_trim_fade(hift.decode(mel, src)[0]))


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 6561, n)]


@pytest.mark.parametrize("n_tokens", [1, 2, 15, 16, 61])
@pytest.mark.parametrize("schedule", [ChunkSchedule(), ChunkSchedule(5, 3.0, 30)])
def test_stream_length_equals_one_shot_exactly(tiny_model, n_tokens, schedule):
    conds = tiny_model.resolve_voice(None)
    tokens = _tokens(n_tokens)
    chunks = list(stream_tokens(tiny_model, iter(tokens), conds, seed=3, options=StreamOptions(chunk_schedule=schedule)))
    total = sum(len(c.samples) for c in chunks)
    assert total == 960 * n_tokens == len(render_tokens(tiny_model, tokens, conds.gen, seed=3))
    assert chunks[-1].is_last and not any(c.is_last for c in chunks[:-1])
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # token ranges are contiguous and cover everything
    assert chunks[0].token_start == 0 and chunks[-1].token_end == n_tokens
    assert all(a.token_end == b.token_start for a, b in zip(chunks, chunks[1:]))


def test_no_tokens_gives_one_empty_last_chunk(tiny_model):
    chunks = list(stream_tokens(tiny_model, iter([]), tiny_model.resolve_voice(None), seed=0))
    assert len(chunks) == 1 and chunks[0].is_last and len(chunks[0].samples) == 0


def test_first_chunk_arrives_before_t3_finishes(tiny_model):
    consumed = []

    def counting(tokens):
        for t in tokens:
            consumed.append(t)
            yield t

    max_tokens = 80
    gen = tiny_model.generate_tokens("Streaming starts early.", seed=2, max_new_tokens=max_tokens)
    stream = stream_tokens(tiny_model, counting(gen), tiny_model.resolve_voice(None), seed=2)
    first = next(stream)
    assert len(first.samples) > 0
    # first + 3 lookahead valid tokens are needed; T3 also samples ids >= 6561 (dropped), and
    # its decode loop runs one step ahead
    assert len(consumed) < max_tokens / 2
    assert first.token_end == ChunkSchedule().first
    assert "ttfa_ms" in first.timings and first.timings["ttfa_ms"] > 0
    rest = list(stream)
    assert len(consumed) == max_tokens and rest[-1].is_last


@pytest.mark.parametrize("sizes", [(24, 48, 96, 96, 36), (5, 7, 200, 1, 87)])
def test_voiced_hift_windows_equal_one_shot_vocoding(voiced_model, sizes):
    """Streamed vocoder windows (committed source, carried fixed-point phase) equal one
    pass over the same mel, with the sine source on."""
    hift = voiced_model.s3gen.mel2wav
    n_frames, seed = sum(sizes), 5
    mel = mx.array(np.random.default_rng(1).standard_normal((1, 80, n_frames)).astype(np.float32) * 2 - 4)
    f0 = np.array(hift.f0(mel))
    assert (f0 > hift.cfg.nsf_voiced_threshold).mean() > 0.9  # the voiced path is really taken
    reference = _one_shot_vocoding(hift, mel, seed)
    stream = HiftStream(hift, seed, StreamOptions())
    pieces, done = [], 0
    for size in sizes:
        pieces.append(stream.push(mel[:, :, done : done + size], final=done + size == n_frames))
        done += size
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(reference)
    assert snr_db(reference, streamed) > HIFT_STREAM_SNR_BOUND_DB


def test_holdback_shorter_than_the_f0_reach_is_refused(voiced_model):
    with pytest.raises(ValueError, match="hift_holdback_frames"):
        HiftStream(voiced_model.s3gen.mel2wav, 0, StreamOptions(hift_holdback_frames=4))


def test_voiced_end_to_end_stream_of_t3_tokens(voiced_model):
    """T3 tokens through the streaming path and the one-shot path: the streamed audio is
    one-shot vocoding of the streamed mel, and that mel is close to one-shot flow."""
    model = voiced_model
    conds = model.resolve_voice(None)
    tokens = [t for t in model.generate_tokens("Streaming through both paths now.", seed=4, max_new_tokens=100) if t < 6561]
    assert len(tokens) > 60
    seed = 5
    renderer = SegmentRenderer(model, conds.gen, seed, StreamOptions(), keep_mel=True)
    chunks = list(stream_tokens(model, iter(tokens), conds, seed=seed, renderer=renderer))
    streamed = np.concatenate([c.samples for c in chunks])
    assert len(chunks) >= 3 and len(streamed) == 960 * len(tokens) == len(render_tokens(model, tokens, conds.gen, seed))
    streamed_mel = mx.concatenate(renderer.mel_chunks, axis=2)
    assert snr_db(_one_shot_vocoding(model.s3gen.mel2wav, streamed_mel, seed), streamed) > HIFT_STREAM_SNR_BOUND_DB

    prompt_token, prompt_feat = _prompt(conds.gen, None)

    def one_shot_mel(toks, noise_seed):
        noise = mx.concatenate([fixed_noise(prompt_feat.shape[1], noise_seed), speech_noise(noise_seed, 0, len(toks))], axis=2)
        return np.array(model.s3gen.flow.inference(mx.array([toks]), prompt_token, prompt_feat, conds.gen["embedding"], noise=noise))

    reference = one_shot_mel(tokens, seed)
    assert snr_db(reference, np.array(streamed_mel)) > FLOW_STREAM_MEL_SNR_BOUND_DB
    # the bound separates: other noise or other tokens stay well below it
    other = [int(t) for t in np.random.default_rng(9).integers(0, 6561, len(tokens))]
    assert snr_db(reference, one_shot_mel(tokens, seed + 1)) < FLOW_STREAM_MEL_SNR_BOUND_DB - 5
    assert snr_db(reference, one_shot_mel(other, seed)) < FLOW_STREAM_MEL_SNR_BOUND_DB - 5


def test_per_chunk_cost_is_flat_along_a_long_input(tiny_model):
    """Every steady-state call works on the same window, however far into the stream."""
    opts = StreamOptions(chunk_schedule=ChunkSchedule(8, 2.0, 16))
    chunks = list(stream_tokens(tiny_model, iter(_tokens(250, seed=4)), tiny_model.resolve_voice(None), seed=1, options=opts))
    steady = [c for c in chunks[3:-1]]
    assert len(steady) >= 10
    assert {c.timings["flow_window_tokens"] for c in steady} == {opts.context_tokens + 16 + 3}
    held = opts.hift_context_frames + opts.hift_holdback_frames
    assert {c.timings["hift_window_frames"] for c in steady} == {held + 2 * 16}
    assert {len(c.samples) for c in steady} == {16 * 960}


def test_closing_the_stream_stops_generation(tiny_model):
    produced = []

    def tokens():
        for t in _tokens(1000):
            produced.append(t)
            yield t

    stream = stream_tokens(tiny_model, tokens(), tiny_model.resolve_voice(None), seed=0)
    next(stream)
    stream.close()
    assert len(produced) < 40


def test_model_stream_speaks_long_text_segment_after_segment(tiny_model):
    text = "First sentence here. " + "word " * 70 + "end. Third one!"
    chunks = list(tiny_model.stream(text, seed=0, max_new_tokens=12, chunk_schedule="8,2,16"))
    assert chunks[-1].is_last and sum(c.is_last for c in chunks) == 1
    assert [c.index for c in chunks] == list(range(len(chunks)))
    segments = split_text(text)
    assert len(segments) == 4  # the 350-character run of words is cut at a word boundary
    assert 0 < sum(len(c.samples) for c in chunks) <= 960 * 12 * len(segments)


def test_split_text_respects_the_limit_and_keeps_every_word():
    text = "Short one. " + ", ".join(["a clause with several words"] * 30) + ". " + "x" * 700 + " tail!"
    segments = split_text(text)
    assert all(0 < len(s) <= MAX_SEGMENT_CHARS for s in segments)
    assert "".join(segments).replace(" ", "") == text.replace(" ", "")
    assert split_text("One. Two? Three!") == ["One.", "Two?", "Three!"]
    assert split_text("   ") == []


def test_runaway_guards():
    assert list(guard_runaway([1, 2] + [7] * 100, max_repeat_run=5)) == [1, 2, 7, 7, 7, 7, 7]
    assert token_budget(10, 1000) == 40 + 8 * 10
    assert token_budget(500, 1000) == 1000


def test_chunk_schedule_parse():
    assert list(zip(range(5), ChunkSchedule.parse("10,2,30").sizes())) == [(0, 10), (1, 20), (2, 30), (3, 30), (4, 30)]
    with pytest.raises(ValueError):
        ChunkSchedule.parse("0,2")


# -- one utterance, two deliveries; the pipelined engine ---------------------------------

LONG_TEXT = "First sentence here. Second one, with a clause! " + "word " * 70 + "end."


def test_synthesize_is_the_concatenation_of_stream(tiny_model):
    options = dict(seed=3, max_new_tokens=30, chunk_schedule="8,2,16")
    chunks = list(tiny_model.stream(LONG_TEXT, **options))
    streamed = np.concatenate([c.samples for c in chunks])
    rendered = tiny_model.synthesize(LONG_TEXT, **options)
    assert len(split_text(LONG_TEXT)) == 4 and len({c.timings["segment"] for c in chunks}) == 4
    assert len(rendered) == len(streamed) > 0
    np.testing.assert_allclose(rendered, streamed, atol=1e-6)
    # the same tokens as T3 gives each segment with its seed, budget and guard
    expected = 0
    for number, segment in enumerate(split_text(LONG_TEXT)):
        budget = token_budget(len(tiny_model.text_tokens(segment)), 30)
        tokens = guard_runaway(tiny_model.generate_tokens(segment, seed=3 + 2 * number, max_new_tokens=budget))
        expected += sum(1 for t in tokens if t < 6561)
    assert len(rendered) == 960 * expected


def test_pipelined_stream_equals_sequential_and_text_runs_equal_the_whole_text(tiny_model):
    options = dict(seed=8, max_new_tokens=20, chunk_schedule="6,2,12")
    whole = np.concatenate([c.samples for c in tiny_model.stream(LONG_TEXT, pipeline=False, **options)])
    piped = np.concatenate([c.samples for c in tiny_model.stream(LONG_TEXT, **options)])
    np.testing.assert_array_equal(whole, piped)
    runs = ["First sentence here. ", "Second one, with a clause! " + "word " * 70 + "end."]
    chunks = list(tiny_model.stream(iter(runs), **options))
    assert chunks[-1].is_last and sum(c.is_last for c in chunks) == 1
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), whole)


def _busy_t3_threads() -> list:
    """T3 threads still running a stream's job (idle ones wait for the next stream)."""
    with _T3Thread._LOCK:
        return [w for w in _T3Thread._ALL if w not in _T3Thread._IDLE]


class _Spy:
    """The tiny model, recording the thread each T3 generation runs on."""

    def __init__(self, model):
        self._model = model
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate_tokens(self, *args, **kwargs):
        self.threads.append(threading.current_thread())
        return self._model.generate_tokens(*args, **kwargs)


def test_t3_runs_on_its_own_thread_while_s3gen_renders(tiny_model):
    spy = _Spy(tiny_model)
    chunks = list(stream_text(spy, "Pipelined speech here.", seed=1, max_new_tokens=40, chunk_schedule="8,2,16"))
    assert [t.name for t in spy.threads] == ["nightingale-t3"] and spy.threads[0] is not threading.current_thread()
    assert chunks[-1].is_last and chunks[-1].timings["t3_tokens_per_s"] > 0
    assert not _busy_t3_threads()  # the job ends with the stream
    again = list(stream_text(spy, "Pipelined speech here.", seed=1, max_new_tokens=40, chunk_schedule="8,2,16"))
    assert spy.threads[1] is spy.threads[0]  # the next stream reuses the idle T3 thread (and its MLX stream)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in again]), np.concatenate([c.samples for c in chunks]))


def test_two_streams_at_once_each_get_a_t3_thread(tiny_model):
    """Streams consumed in turns on one thread: each needs T3 running, so the second gets a
    thread of its own rather than waiting for the first's (which would never end)."""
    spy = _Spy(tiny_model)
    kwargs = dict(max_new_tokens=40, chunk_schedule="4,1,4")  # T3 may run 14 tokens ahead: it blocks
    alone = [np.concatenate([c.samples for c in stream_text(tiny_model, text, seed=seed, **kwargs)])
             for text, seed in (("First voice here.", 1), ("Second one there.", 2))]
    a = stream_text(spy, "First voice here.", seed=1, **kwargs)
    b = stream_text(spy, "Second one there.", seed=2, **kwargs)
    got: list[list] = [[], []]
    pending = [a, b]
    while pending:
        for stream in list(pending):
            chunk = next(stream, None)
            if chunk is None:
                pending.remove(stream)
            else:
                got[0 if stream is a else 1].append(chunk.samples)
    assert len(spy.threads) == 2 and spy.threads[0] is not spy.threads[1]
    for samples, want in zip(got, alone):
        np.testing.assert_array_equal(np.concatenate(samples), want)
    assert not _busy_t3_threads()


def test_token_queue_is_bounded():
    """T3 never runs more than the queue's size ahead of a consumer that does not read."""
    produced = []

    def generate(text, seed):
        for t in range(10_000):
            produced.append(t)
            yield t

    pump = TokenPump(generate, iter([("text", 0)]), max_tokens=20)
    try:
        assert pump.next_segment() == "text"
        deadline = time.monotonic() + 30
        while not pump._queue.full() and time.monotonic() < deadline:
            pump._done.wait(0.01)
        pump._done.wait(0.2)  # had it not blocked, it would produce thousands meanwhile
        assert pump._queue.full() and len(produced) <= 20 + 2
    finally:
        pump.close()
    assert pump._done.is_set()


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_or_close_stops_t3_and_s3gen(tiny_model, how):
    cancel = threading.Event()
    produced = []
    generate = tiny_model.generate_tokens

    class Counting:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def generate_tokens(self, *args, **kwargs):
            for t in generate(*args, **kwargs):
                produced.append(t)
                yield t

    stream = stream_text(Counting(), "Stop me early please.", seed=0, max_new_tokens=1000, chunk_schedule="8,2,16",
                         cancel=cancel)
    next(stream)
    if how == "cancel":
        cancel.set()
        with pytest.raises(Cancelled):  # nothing more is delivered
            next(stream)
    else:
        stream.close()
    assert not _busy_t3_threads()
    n = len(produced)
    assert n < 200  # bounded by the queue, far from the 1000-token budget
    assert len(produced) == n


def test_cancel_stops_the_cfm_between_steps(tiny_model):
    cancel = threading.Event()
    cancel.set()
    conds = tiny_model.resolve_voice(None)
    renderer = SegmentRenderer(tiny_model, conds.gen, 0, StreamOptions(), cancel)
    renderer.add(_tokens(20))
    with pytest.raises(Cancelled):
        renderer.render(None, final=True)


def test_first_chunk_timesteps_change_only_the_start(tiny_model):
    """Fewer CFM steps for the utterance's first chunk: same length, a different first chunk."""
    options = dict(seed=2, max_new_tokens=40, chunk_schedule="12,2,16", pipeline=False)
    base = list(tiny_model.stream("First chunk policy.", first_chunk_timesteps=None, **options))
    fast = list(tiny_model.stream("First chunk policy.", first_chunk_timesteps=2, **options))
    same = list(tiny_model.stream("First chunk policy.", first_chunk_timesteps=10, **options))
    assert [len(c.samples) for c in fast] == [len(c.samples) for c in base]
    assert not np.allclose(fast[0].samples, base[0].samples)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in same]), np.concatenate([c.samples for c in base]))


def test_a_lazily_loaded_voice_streams_through_t3s_thread(tiny_model, tmp_path):
    """A voice read with mx.load is a lazy graph on this thread's stream; the pipelined
    stream must still work with it (T3's thread cannot evaluate another thread's stream)."""
    conds = tiny_model.resolve_voice(None)
    path = tmp_path / "voice.safetensors"
    arrays = {f"gen.{k}": v for k, v in conds.gen.items() if isinstance(v, mx.array)}
    arrays |= {"t3.speaker_emb": conds.t3.speaker_emb, "t3.tokens": conds.t3.cond_prompt_speech_tokens,
               "t3.emotion_adv": conds.t3.emotion_adv}
    mx.save_safetensors(str(path), arrays)
    lazy = mx.load(str(path))
    voice = Conditionals(
        T3Cond(lazy["t3.speaker_emb"] * 1.0, lazy["t3.tokens"], lazy["t3.emotion_adv"] * 1.0),
        {**conds.gen, **{k[4:]: v for k, v in lazy.items() if k.startswith("gen.")}},
    )
    chunks = list(tiny_model.stream("Hello.", voice=voice, seed=1, max_new_tokens=12))
    expected = list(tiny_model.stream("Hello.", voice=conds, seed=1, max_new_tokens=12))
    np.testing.assert_allclose(np.concatenate([c.samples for c in chunks]),
                               np.concatenate([c.samples for c in expected]), atol=1e-5)
