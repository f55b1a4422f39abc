"""`gorilla-jax run --apis DB.jsonl`: the main job on your own API database (a custom hub):
training on its train split of instructions, answers to its eval split, strict scores, report."""
import json

import pytest

from data_pipeline import apizoo
from data_pipeline.custom_hub import CustomHub
from data_pipeline.prompts import build_training_example
from eval.report import read_metrics
from eval.runner import GenerationSettings, build_questions, evaluate_hub, make_retriever_for
from eval.score import score_custom_file
from gorilla_jax.cli import main
from gorilla_jax.errors import GorillaError
from runner_helpers import scripted_model, train_tokenizer

STEPS = 24
FAST = [f"train.steps={STEPS}", "train.checkpoint_every=12", "train.log_every=4",
        "optimizer.warmup_steps=2", "eval.max_new_tokens=32", "train.tensorboard=false",
        "model.vocab_size=512", "data.seq_len=384"]

RECORDS = [
    {"domain": "Payments", "framework": "Stripe API", "functionality": "Create a charge",
     "api_name": "stripe.Charge.create",
     "api_call": "stripe.Charge.create(amount={amount}, currency={currency})",
     "api_arguments": {"amount": "integer, in cents", "currency": "three-letter ISO code"},
     "description": "Charges a credit card or other payment source.",
     "questions": ["Charge Jenny Rosen 20 dollars.", "Bill the customer 5 euros for shipping.",
                   "Take a payment of 12 USD from the saved card.",
                   "Collect 30 pounds for the yearly subscription."]},
    {"domain": "Calendar", "framework": "Google Calendar API", "functionality": "List events",
     "api_name": "events.list", "api_call": "service.events().list(calendarId: str).execute()",
     "api_arguments": {"calendarId": "calendar identifier, 'primary' for the user's own"},
     "description": "Returns the events on the specified calendar.",
     "questions": ["What is on my calendar this week?", "Show the meetings of the team calendar.",
                   "List everything scheduled in my primary calendar.",
                   "Which appointments do I have coming up?"]},
    {"domain": "Monitoring", "framework": "Datadog API", "functionality": "List the users of a role",
     "api_name": "Roles: list users", "api_call": "GET /api/v2/roles/{role_id}/users",
     "description": "Gets all users of a role.",
     "questions": ["Who has the admin role in our monitoring account?",
                   "Find the members of the on-call role.",
                   "Which people are assigned the read-only role?",
                   "Show every user that belongs to role 42."]},
    {"domain": "Numerics", "framework": "numpy", "functionality": "Evenly spaced numbers",
     "api_name": "numpy.linspace", "api_call": "numpy.linspace(start, stop, num=50)",
     "parameters": [{"name": "start", "kind": "positional_or_keyword", "required": True},
                    {"name": "stop", "kind": "positional_or_keyword", "required": True},
                    {"name": "num", "kind": "positional_or_keyword", "required": False}],
     "description": "Return evenly spaced numbers over a specified interval.",
     "questions": ["Make 5 evenly spaced points between 0 and 1.",
                   "I need a grid of 100 values from -3 to 3.",
                   "Sample the interval from 10 to 20 at equal steps.",
                   "Create evenly spaced angles between 0 and pi."]},
    {"domain": "Finance", "framework": "yfinance", "functionality": "Price history of a ticker",
     "api_name": "Ticker.history", "api_call": "yf.Ticker(ticker).history(period={period})",
     "api_arguments": {"ticker": "stock symbol", "period": "e.g. 1mo, 1y, max"},
     "description": "Downloads the historical market data of a stock.",
     "questions": ["Get the last month of Apple share prices.",
                   "Download a year of Tesla stock history.",
                   "Fetch the full price history of Microsoft.",
                   "Show me five days of Nvidia quotes."]},
    {"domain": "Messaging", "framework": "Slack API", "functionality": "Post a message",
     "api_name": "chat.postMessage", "api_call": "POST /api/chat.postMessage",
     "description": "Sends a message to a channel.",
     "questions": ["Send 'deploy finished' to the #ops channel.",
                   "Tell the team channel that lunch is ready.",
                   "Announce the release in the general channel.",
                   "Write a note to the support channel about the outage."]},
    {"domain": "Serialization", "framework": "Python standard library", "functionality": "To JSON",
     "api_name": "json.dumps", "api_call": "json.dumps(obj, indent=None)",
     "description": "Serialize an object to a JSON formatted string.",
     "questions": ["Turn this dictionary into a JSON string.",
                   "Serialize the config object as text I can save.",
                   "Encode the list of users as JSON.",
                   "Convert the response data into a JSON document."]},
    {"domain": "HTTP", "framework": "requests", "functionality": "Send a GET request",
     "api_name": "requests.get", "api_call": "requests.get(url, params=None)",
     "description": "Sends a GET request and returns the response.",
     "questions": ["Download the page at example.com.", "Fetch the JSON from the weather endpoint.",
                   "Read the contents of a web URL.", "Query the search endpoint with a keyword."]},
    {"domain": "Files", "framework": "Python standard library", "functionality": "Join paths",
     "api_name": "os.path.join", "api_call": "os.path.join(path, *paths)",
     "description": "Join one or more path components intelligently.",
     "questions": ["Build the path of data/train.csv under the home directory.",
                   "Combine the folder name and the file name into one path.",
                   "Put the logs directory and today's file name together.",
                   "Make a path to config.yaml inside the project root."]},
    {"domain": "Vector database", "framework": "Weaviate API", "functionality": "Read the schema",
     "api_name": "schema.get", "api_call": "client.schema.get()",
     "description": "Returns the schema of all classes of the Weaviate instance.",
     "questions": ["Which classes are defined in my vector database?",
                   "Show the current schema of the Weaviate instance.",
                   "Inspect how the collections are configured.",
                   "Print the data model of the vector store."]},
]


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("apis") / "my_apis.jsonl"
    apizoo.write_api_db(RECORDS, path)
    return path


def test_evaluate_hub_on_a_custom_hub(db, tmp_path):
    """Questions and prompts as training builds them, retrievers over the database's records,
    and strict scores that follow exactly from a scripted model that copies its document."""
    hub = CustomHub.load(db)
    evals = hub.examples("eval")
    answers = {}
    for mode in ("none", "oracle", "bm25"):
        questions = build_questions(evals, make_retriever_for("custom", mode, apis=hub), "gorilla")
        assert [q.question_id for q in questions] == list(range(1, len(evals) + 1))
        for ex, q in zip(evals, questions):
            assert q.prompt == build_training_example(ex, mode, q.documents, "gorilla").prompt
            call = q.documents[0].api_call if q.documents else "unknown.call('nothing')"
            answers[q.prompt.strip()] = (f"<<<domain>>>: x\n<<<api_call>>>: {call}\n"
                                         "<<<api_provider>>>: p")
        if mode == "oracle":
            assert [q.documents[0].api_call for q in questions] == [e.api.api_call for e in evals]
        if mode == "bm25":
            bm25_hits = sum(q.documents[0].api_call == e.api.api_call
                            for e, q in zip(evals, questions))
            assert 0 < bm25_hits < len(evals)  # bm25 finds some of the right APIs, not all

    model = scripted_model(train_tokenizer(tmp_path / "tok"), lambda p: answers[p.strip()])
    settings = GenerationSettings(max_new_tokens=200, batch_size=5)
    expected = {"oracle": (1.0, 0.0), "none": (0.0, 1.0), "bm25": (bm25_hits / len(evals), 0.0)}
    for mode, (accuracy, hallucination) in expected.items():
        run = evaluate_hub(model, "custom", mode, tmp_path, apis=db, settings=settings,
                           progress=False)
        assert list(run.scores) == ["strict"] and run.n == len(evals) and run.apis == str(db)
        result = run.scores["strict"]
        assert (result.accuracy, result.hallucination) == (accuracy, hallucination)
        assert not (tmp_path / f"custom_{mode}" / "details_gorilla.jsonl").exists()
        saved = json.loads((tmp_path / f"custom_{mode}" / "scores.json").read_text())
        assert list(saved["scores"]) == ["strict"] and saved["apis"] == str(db)
    limited = evaluate_hub(model, "custom", "oracle", tmp_path / "lim", apis=hub, limit=3,
                           settings=settings, progress=False)
    assert [r["question_id"] for r in read_jsonl(limited.responses_path)] == [1, 2, 3]
    with pytest.raises(GorillaError, match="needs an API database"):
        evaluate_hub(model, "custom", "oracle", tmp_path)
    with pytest.raises(GorillaError, match="only for hub 'custom'"):
        evaluate_hub(model, "torchhub", "oracle", tmp_path, apis=db)


def test_run_on_a_custom_api_database(db, tmp_path, capsys):
    hub = CustomHub.load(db)
    train, evals = hub.examples("train"), hub.examples("eval")
    assert len(train) + len(evals) == 40 and len(evals) >= 4
    out = tmp_path / "job"
    assert main(["run", "--apis", str(db), "--out", str(out), "--no-progress", *FAST]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())

    # trained on the database's train split: its config, its tokenizer, a falling loss
    config = (out / "run" / "config.yaml").read_text()
    assert "hub: custom" in config and f"apis: {db}" in config
    assert summary["api_database"] == {
        "path": str(db), "sha256": hub.db.sha256, "apis": 10,
        "train_instructions": len(train), "eval_instructions": len(evals)}
    assert summary["train_steps"] == STEPS and summary["train_status"] == "completed"
    assert summary["loss_first"] > 5.5  # ~ln(512) at random init
    assert summary["loss_last"] < summary["loss_first"] - 1.5
    assert [s for s, _ in read_metrics(out / "run")[0]] == list(range(4, STEPS + 1, 4))
    assert f"on custom ({db})" in printed

    # answered every eval question with each retriever it was trained with; strict scores only
    assert summary["hubs"] == ["custom"] and summary["retrievers"] == ["none", "oracle"]
    rows = summary["scores"]
    assert [(r["hub"], r["retriever"], r["mode"]) for r in rows] == [
        ("custom", "none", "strict"), ("custom", "oracle", "strict")]
    report = (out / "report.md").read_text()
    for row in rows:
        sub = out / "eval" / f"custom_{row['retriever']}"
        responses = read_jsonl(sub / "responses.jsonl")
        assert [r["question_id"] for r in responses] == list(range(1, len(evals) + 1))
        assert row["n"] == len(evals) and all(r["metadata"]["apis"] == str(db) for r in responses)
        details = read_jsonl(sub / "details_strict.jsonl")
        assert [d["ground_truth_api_call"] for d in details] == [e.api_call for e in evals]
        counts = {v: sum(d["verdict"] == v for d in details) for v in ("correct", "error",
                                                                          "hallucination")}
        assert row["accuracy"] == counts["correct"] / len(evals)
        assert 0.0 <= row["accuracy"] <= 1.0
        rescored = score_custom_file(db, sub / "responses.jsonl")
        assert (rescored.accuracy, rescored.hallucination, rescored.error) == \
            (row["accuracy"], row["hallucination"], row["error"])
        assert not (sub / "details_gorilla.jsonl").exists()
        assert (f"| custom | {row['retriever']} | strict | {len(evals)} | "
                f"{100 * row['accuracy']:.1f}% |") in report
    assert "| gorilla |" not in report and "*gorilla* mode" not in report
    assert "the only mode for your own API databases" in report
    assert f"the API database `{db}` (10 APIs; {len(train)} training and {len(evals)} eval" in report

    # the APIBench-only evaluations are reported as skipped, with the reason
    assert summary["doc_change"] == [] and summary["constraints"] == []
    assert set(summary["skipped"]) == {"doc_change", "constraints"}
    assert "## Not evaluated" in report and "not run on a custom hub" in report
    assert "doc change: not run on a custom hub" in printed

    # `gorilla-jax evaluate` on the run directory finds the database in the run's config and
    # answers the same (greedy decoding)
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out / "run"), "--hub", "custom", "--retriever",
                 "oracle", "--max-new-tokens", "32", "--out", str(ev), "--no-progress",
                 "--json", "--doc-change"]) == 0
    ev_summary = json.loads(capsys.readouterr().out)
    assert ev_summary["apis"] == str(db) and [r["mode"] for r in ev_summary["scores"]] == ["strict"]
    assert list(ev_summary["skipped"]) == ["doc_change"]
    assert [r["text"] for r in read_jsonl(ev / "custom_oracle" / "responses.jsonl")] == \
        [r["text"] for r in read_jsonl(out / "eval" / "custom_oracle" / "responses.jsonl")]


def test_run_custom_errors(db, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "apis.jsonl"
    assert main(["run", "--apis", str(missing), "--out", str(tmp_path / "a")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing was started

    assert main(["run", "--out", str(tmp_path / "b"), "data.hub=custom"]) == 2
    assert "data.apis" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n", encoding="utf-8")
    assert main(["run", "--apis", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err

    assert main(["run", "--apis", str(db), "--hub", "torchhub", "--out", str(tmp_path / "d")]) == 2
    assert "--apis" in capsys.readouterr().err

    # questions-free database: nothing to train on, said before training
    bare = tmp_path / "bare.jsonl"
    apizoo.write_api_db([{k: v for k, v in r.items() if k != "questions"} for r in RECORDS], bare)
    assert main(["run", "--apis", str(bare), "--out", str(tmp_path / "e")]) == 2
    assert f"{bare}: no training instructions" in capsys.readouterr().err

    assert main(["evaluate", "--model", str(tmp_path), "--hub", "custom"]) == 2
    assert "--hub custom needs --apis" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--hub", "torchhub", "--apis", str(db)]) == 2
    assert "--apis is only for --hub custom" in capsys.readouterr().err
