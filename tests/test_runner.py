"""eval.runner: questions and prompts as the data pipeline builds them, batched generation,
Gorilla-format response files scored in both modes, the `gorilla-jax evaluate` command."""
import json

import pytest

from data_pipeline.layout import HUBS, hub_files, shared_apibench_dir
from data_pipeline.prompts import build_training_example, target_text
from eval.runner import (GenerationSettings, _fit_prompt, build_questions, eval_examples,
                         evaluate_hub, generate_texts, make_eval_model, make_retriever_for,
                         resolve_prompt_format)
from eval.score import score_file, score_responses
from gorilla_jax.cli import main
from runner_helpers import TINY, scripted_model, tiny_params, train_tokenizer

FILE_KIND = {"none": "0_shot", "oracle": "oracle", "bm25": "bm25"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tiny_model(tok):
    return make_eval_model(tiny_params(), TINY, tok, prompt_format="gorilla", model_id="tiny")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize("mode", ["none", "oracle", "bm25"])
def test_question_texts_equal_gorilla_question_files(hub, mode):
    questions = build_questions(eval_examples(hub), make_retriever_for(hub, mode), "gorilla")
    expected = read_jsonl(hub_files(hub).questions(FILE_KIND[mode]))
    assert [(q.question_id, q.text) for q in questions] == \
        [(e["question_id"], e["text"]) for e in expected]
    assert all(q.prompt == f"###USER: {q.text}###ASSISTANT: " for q in questions)


def test_question_texts_on_real_apibench():
    data = shared_apibench_dir()
    if data is None:
        pytest.skip("APIBench is not at ../shared/apibench (set GORILLA_JAX_APIBENCH)")
    for mode in ("none", "oracle"):
        questions = build_questions(eval_examples("torchhub", data), make_retriever_for(
            "torchhub", mode, data), "gorilla")
        expected = read_jsonl(hub_files("torchhub", data).questions(FILE_KIND[mode]))
        assert len(questions) == 186
        assert [(q.question_id, q.text) for q in questions] == \
            [(e["question_id"], e["text"]) for e in expected]


def test_prompts_and_ids_are_what_training_saw(tok):
    from data_pipeline.packing import tokenize_examples

    examples = eval_examples("huggingface")[:4]
    for mode in ("none", "oracle"):
        questions = build_questions(examples, make_retriever_for("huggingface", mode), "gorilla")
        for ex, q in zip(examples, questions):
            train_text = build_training_example(ex, mode, q.documents, "gorilla")
            assert q.prompt == train_text.prompt
            tokens, _ = tokenize_examples([train_text], tok, seq_len=4096)
            model = make_eval_model(tiny_params(), TINY, tok)
            assert model.prompt_ids(q.prompt) == tokens.example(0)[:tokens.prompt_lens[0]].tolist()


def test_scripted_answers_are_written_in_order_and_scored_exactly(tok, tmp_path):
    """Odd question ids get the reference answer, even ones an invented API: the response
    file, its order and both modes' numbers follow exactly."""
    examples = {ex.index: ex for ex in eval_examples("torchhub")}
    by_prompt = {}
    for q in build_questions(list(examples.values()), make_retriever_for("torchhub", "oracle"),
                             "gorilla"):
        by_prompt[q.prompt.strip()] = q.question_id

    def answer(prompt_text):
        qid = by_prompt[prompt_text.strip()]
        if qid % 2:
            return target_text(examples[qid].target)
        return "<<<domain>>>: Classification\n<<<api_call>>>: torch.hub.load('nobody/none', 'x')"

    model = scripted_model(tok, answer)
    run = evaluate_hub(model, "torchhub", "oracle", tmp_path,
                       settings=GenerationSettings(max_new_tokens=400, batch_size=5), progress=False)
    assert model.generator.batches == [5, 5, 2]  # 12 questions in length-sorted batches of 5
    rows = read_jsonl(run.responses_path)
    assert [r["question_id"] for r in rows] == sorted(examples)
    assert set(rows[0]) == {"question_id", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["model_id"] == "scripted" and rows[0]["metadata"]["retriever"] == "oracle"
    assert len({r["answer_id"] for r in rows}) == 12
    for r in rows:
        ex = examples[r["question_id"]]
        want = answer(build_questions([ex], make_retriever_for("torchhub", "oracle"),
                                      "gorilla")[0].prompt)
        assert r["text"] == tok.decode(tok.encode(want, add_bos=False)).strip()
    odd = sum(1 for q in examples if q % 2)
    for mode in ("gorilla", "strict"):
        s = run.scores[mode]
        # the reference answers alone, scored without the runner: odd ids must get their verdicts
        ref = score_responses("torchhub", [{"question_id": q, "text": target_text(ex.target)}
                                           for q, ex in examples.items()], mode=mode)
        want = {d.question_id: d.verdict if d.question_id % 2 else "hallucination"
                for d in ref.details}
        assert {d.question_id: d.verdict for d in s.details} == want
        assert s.count("hallucination") == 12 - odd
        # Gorilla's first-match quirk: the reference 'deeplabv3_resnet50' call also contains
        # 'resnet50' (an earlier record of another domain), so question 7 is an error there
        assert s.count("correct") == (odd - 1 if mode == "gorilla" else odd)
        assert score_file("torchhub", run.responses_path, mode=mode).summary() == s.summary()
        assert [d["verdict"] for d in read_jsonl(tmp_path / "torchhub_oracle" / f"details_{mode}.jsonl")] \
            == [d.verdict for d in s.details]
    summary = json.loads((tmp_path / "torchhub_oracle" / "scores.json").read_text())
    assert summary["scores"]["strict"]["accuracy"] == odd / 12 and summary["n"] == 12


def test_generation_batched_equals_one_by_one_on_a_real_model(tiny_model):
    prompts = [q.prompt for q in build_questions(
        eval_examples("tensorflowhub")[:5], make_retriever_for("tensorflowhub", "none"), "gorilla")]
    prompts.append(build_questions(eval_examples("tensorflowhub")[:1], make_retriever_for(
        "tensorflowhub", "oracle"), "gorilla")[0].prompt)  # a much longer one
    settings = GenerationSettings(max_new_tokens=12, batch_size=4)
    batched = generate_texts(tiny_model, prompts, settings, progress=False)
    alone = generate_texts(tiny_model, prompts, GenerationSettings(max_new_tokens=12, batch_size=1),
                           progress=False)
    assert batched.texts == alone.texts and batched.new_tokens == alone.new_tokens
    assert all(0 < n <= 12 for n in batched.new_tokens)
    assert len(set(batched.texts)) > 1  # different prompts, different (random-model) answers
    sampled = GenerationSettings(max_new_tokens=12, batch_size=4, temperature=1.0, seed=3)
    a = generate_texts(tiny_model, prompts, sampled, progress=False)
    assert a.texts == generate_texts(tiny_model, prompts, sampled, progress=False).texts
    assert a.texts != batched.texts


def test_prompt_truncation_keeps_bos_and_the_end():
    assert _fit_prompt([1, 5, 6, 7, 8], 3, True) == [1, 7, 8]
    assert _fit_prompt([5, 6, 7, 8], 3, False) == [6, 7, 8]
    assert _fit_prompt([1, 5], 3, True) == [1, 5]


def test_long_prompts_are_cut_and_counted(tok):
    model = make_eval_model(tiny_params(), TINY, tok, max_prompt_tokens=40)
    out = generate_texts(model, ["word " * 100, "short"], GenerationSettings(4, 2), progress=False)
    assert out.truncated_prompts == 1 and len(out.texts) == 2


def test_prompt_format_resolution(tok, tmp_path):
    assert resolve_prompt_format(None, tok) == "gorilla"  # no chat template
    assert resolve_prompt_format(None, tok, "chat") == "chat"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  prompt_format: chat\n")
    assert resolve_prompt_format(tmp_path / "run", tok) == "chat"  # a run's own format wins
    from gorilla_jax.errors import GorillaError

    with pytest.raises(GorillaError, match="unknown prompt format"):
        resolve_prompt_format(None, tok, "alpaca")
    with pytest.raises(GorillaError, match="batch_size"):
        GenerationSettings(batch_size=0).check()


def test_evaluate_command_on_a_checkpoint(tok, tiny_model, tmp_path, capsys):
    """The whole path from a saved model: load, prompts, generation, responses, scores, report."""
    from gorilla_jax.checkpoint import save_params
    from gorilla_jax.tokenizer import copy_tokenizer_files

    ckpt = save_params(tmp_path / "ckpt", tiny_params(), TINY)
    copy_tokenizer_files(tok.path.parent if tok.path.is_file() else tok.path, ckpt)
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(ckpt), "--hub", "torchhub", "huggingface",
                 "--retriever", "oracle", "none", "--limit", "3", "--out", str(out),
                 "--max-new-tokens", "10", "--batch-size", "4", "--no-progress", "--json",
                 "--doc-change", "--constraints", "--cache-windows", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompt_format"] == "gorilla"
    assert [(r["hub"], r["retriever"], r["mode"]) for r in summary["scores"]] == [
        (h, r, m) for h in ("torchhub", "huggingface") for r in ("oracle", "none")
        for m in ("gorilla", "strict")]
    report = (out / "report.md").read_text()
    for row in summary["scores"]:
        path = out / f"{row['hub']}_{row['retriever']}" / "responses.jsonl"
        responses = read_jsonl(path)
        assert [r["question_id"] for r in responses] == [1, 2, 3] and row["n"] == 3
        rescored = score_file(row["hub"], path, mode=row["mode"])
        assert (rescored.accuracy, rescored.hallucination, rescored.error) == \
            (row["accuracy"], row["hallucination"], row["error"])
        assert (f"| {row['hub']} | {row['retriever']} | {row['mode']} | 3 | "
                f"{100 * row['accuracy']:.1f}% | {100 * row['hallucination']:.1f}% | "
                f"{100 * row['error']:.1f}% |") in report
        # the random model's answers are what the in-memory model (its cache grown in windows,
        # the CPU default) generates for these prompts
    same = generate_texts(tiny_model, [q.prompt for q in build_questions(
        eval_examples("torchhub", limit=3), make_retriever_for("torchhub", "none"), "gorilla")],
        GenerationSettings(10, 4), progress=False)
    assert [r["text"] for r in read_jsonl(out / "torchhub_none" / "responses.jsonl")] == same.texts
    assert (out / "scores.png").is_file()
    assert [d["n"] + d["skipped"] for d in summary["doc_change"]] == [3, 3]
    assert (out / "torchhub_doc_change" / "responses.jsonl").is_file()
    assert {(c["hub"], c["retriever"]) for c in summary["constraints"]} == {
        (h, r) for h in ("torchhub", "huggingface") for r in ("oracle", "none")}
    # `gorilla-jax eval score` reads the runner's file too
    assert main(["eval", "score", "--hub", "torchhub", "--responses",
                 str(out / "torchhub_oracle" / "responses.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert main(["evaluate", "--model", str(ckpt), "--hub", "torchhub", "--limit", "1",
                 "--out", str(tmp_path / "out0"), "--cache-windows", "0", "--no-progress"]) == 2
    assert "cache_windows must be >= 1" in capsys.readouterr().err


def test_evaluate_command_errors(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--hub", "torchhub"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--hub", "torchhub", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
