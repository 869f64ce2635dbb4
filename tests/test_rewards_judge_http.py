"""The LLM-judge reward over HTTP, against a real OpenAI-compatible server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import RewardInput, RewardRunner, pathreasoner_specs
from rewards.entities import entity_dice


class Judge(BaseHTTPRequestHandler):
    """Replies like a chat-completions endpoint; the score depends on the candidate answer."""

    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append((self.path, self.headers.get("Authorization"), body))
        user = body["messages"][-1]["content"]
        candidate = user.split("Candidate answer:\n")[1].split("\n\n")[0]
        if candidate == "crash":
            self.send_response(500)
            self.end_headers()
            return
        reply = {"adenocarcinoma": "The candidate matches.\nScore: 0.9", "adenoma": "Score: 2/10"}.get(
            candidate, "I cannot tell.")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


ROW = {"id": "j", "question": "What is the diagnosis?", "answer": "Invasive adenocarcinoma",
       "entities": ["adenocarcinoma", "necrosis"]}


def sample(index, answer):
    response = (f"<observe>Irregular glands, necrotic debris</observe><think>Adenocarcinoma</think>"
                f"<answer>{answer}</answer>") if answer is not None else "no tags at all"
    return RewardInput.from_row(index, ROW, response)


def test_pathreasoner_reward_with_http_judge(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-token")
    specs = pathreasoner_specs("judge_http", {"url": server, "model": "judge-model", "api_key_env": "JUDGE_KEY",
                                              "request_timeout_s": 10})
    inputs = [sample(0, "adenocarcinoma"), sample(1, "adenoma"), sample(2, "something else"), sample(3, None),
              sample(4, "crash")]
    Judge.requests.clear()
    with RewardRunner(specs, timeout_s=20) as runner:
        batch = runner.score(inputs)
    assert batch.components["semantic"][:2] == pytest.approx([0.9, 0.2])
    assert batch.components["semantic"][3] == 0.0 and batch.metrics["semantic/no_answer"][3] == 1.0
    errors = {e.index: e for e in batch.errors}
    assert sorted(errors) == [2, 4] and all(e.reward == "semantic" for e in errors.values())
    assert "no score in [0, 1]" in errors[2].message and "I cannot tell" in errors[2].message
    assert "HTTPError" in errors[4].message and "500" in errors[4].message
    # R = format + semantic + 0.5 * entity, the entity part computed in-process as the reference.
    entity = entity_dice(inputs[0])["score"]
    assert batch.scores[0] == pytest.approx(1.0 + 0.9 + 0.5 * entity)
    assert batch.scores[2] is None and batch.scores[4] is None
    path, auth, body = Judge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret-token"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "Reference answer:\nInvasive adenocarcinoma" in body["messages"][1]["content"]
    assert len(Judge.requests) == 4  # the response without <answer> is never sent
