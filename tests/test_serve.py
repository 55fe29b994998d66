"""`multimodal serve`: its JSON API (in this process, through FastAPI's TestClient), the micro-batcher, the
thumbnails read only from the files and shard members `embed` recorded, a few thousand malformed requests,
and, through the CLI in a process of its own, the token, the warning for another host and the mistakes
refused at start-up."""

import asyncio
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal.data.shards import write_synthetic
from tests.conftest import MEMORY_LIMIT, limit_memory, run_cli

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

SENTENCE = re.compile(r"^[^\n]{8,400}[.?!]$")  # one sentence: no line breaks, ends as a sentence does


def is_sentence(text: str) -> bool:
    """SENTENCE, each long path it names counted as one character (a test folder's path may be long)."""
    return bool(SENTENCE.match(text[:8] + re.sub(r"(/[^\s/]+){3,}", "/", text[8:-1]) + text[-1:]))


def embed(*args: str, cwd: Path) -> None:
    """`multimodal embed ARGS` in this process (the model loads in a second, not the 7 s of a new process)."""
    from multimodal.cli import main

    saved = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["embed", *args, "--num_workers", "0"]) == 0
    finally:
        os.chdir(saved)


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict:
    """An embedding folder of synthetic shards (images read back from tar members, captions) and one of a folder
    of image files, both from the tiny trained model."""
    root = tmp_path_factory.mktemp("serve")
    write_synthetic(root / "shards", num_samples=24, shard_size=8)
    embed("--checkpoint", str(trained[0]), "--shards", str(root / "shards"), "--out", str(root / "emb"), cwd=root)
    return {"root": root, "ckpt": trained[0], "shards": root / "emb"}


def image_folder(root: Path, count: int = 6) -> Path:
    """`count` PNG scenes, each another colour and size, in a folder of their own."""
    folder = root / "photos"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(root)))
    for i in range(count):
        pixels = rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)
        pixels[:, : 8 * (i + 1)] = (40 * i, 255 - 40 * i, 128)
        Image.fromarray(pixels).save(folder / f"scene{i}.png")
    return folder


@pytest.fixture(scope="module")
def model(folders):
    from multimodal import weights

    return weights.load_model(folders["ckpt"])


def client_of(index: Path, model, **options) -> TestClient:
    from multimodal.serve.app import create_app
    from multimodal.serve.engine import Engine, open_targets
    from multimodal.serve.thumbnails import for_target

    targets = open_targets(index)
    thumbnails = for_target(targets["images"], index) if "images" in targets else None
    return TestClient(create_app(Engine(model, targets, index), thumbnails, **options))


@pytest.fixture(scope="module")
def api(folders, model):
    with client_of(folders["shards"], model, max_upload=256 << 10) as client:
        yield client


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_search_by_text_by_row_and_by_uploaded_image(api):
    found = api.get("/api/search", params={"q": "a large red circle on the left", "k": 5})
    assert found.status_code == 200, found.text
    results = found.json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["caption"] and r["thumbnail"] == f"/api/thumbnail/{r['row']}" for r in results)
    assert all(".tar#" in r["source"] for r in results)  # read back from the shards' members

    row = results[2]["row"]
    by_row = api.get("/api/search", params={"row": row, "k": 3}).json()
    assert by_row["query"]["row"] == row and by_row["results"][0]["row"] == row
    assert by_row["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)

    thumb = api.get(f"/api/thumbnail/{row}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "JPEG" and max(image.size) <= 256
    for upload in ({"content": png(image), "headers": {"Content-Type": "image/png"}},
                   {"files": {"image": ("scene.png", png(image), "image/png")}}):
        by_image = api.post("/api/search", params={"k": 3}, **upload)
        assert by_image.status_code == 200, by_image.text
        assert by_image.json()["results"][0]["row"] == row  # the image finds itself first

    texts = api.get("/api/search", params={"q": "three green triangles", "target": "texts", "k": 4}).json()
    assert texts["target"] == "texts" and len(texts["results"]) == 4
    assert all(r["caption"] and "thumbnail" not in r for r in texts["results"])
    info = api.get("/api/info").json()
    assert info["targets"]["images"] == {"count": 24, "search": "exact"} and info["targets"]["texts"]["count"] == 72


def test_the_page_is_one_file_with_no_external_assets(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from another host
    assert "@import" not in page.text and "<link" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for needed in ('id="q"', 'id="file"', 'id="grid"', 'role="search"', "aria-live", "img.alt", "history.pushState"):
        assert needed in page.text


def test_queries_arriving_together_are_encoded_as_one_batch():
    from multimodal.serve.batching import MicroBatcher

    batches = []
    started, release = threading.Event(), threading.Event()

    def run(items):
        batches.append(list(items))
        started.set()
        release.wait(10)  # the first batch is busy while the others arrive
        return [item * 10 for item in items]

    async def main():
        batcher = MicroBatcher(run, max_batch=8)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        while not started.is_set():
            await asyncio.sleep(0.001)
        others = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 13)]
        await asyncio.sleep(0)  # each has queued its query
        release.set()
        answers = await asyncio.gather(first, *others)
        await batcher.stop()
        return answers

    assert asyncio.run(main()) == [i * 10 for i in range(13)]
    assert [len(b) for b in batches] == [1, 8, 4]  # the twelve that came during the first: two batches, in order
    assert [x for b in batches for x in b] == list(range(13))


def test_a_batch_answers_as_its_queries_one_by_one(folders, model):
    from multimodal.serve.engine import Engine, Query, open_targets

    engine = Engine(model, open_targets(folders["shards"]), folders["shards"])
    queries = [Query("text", "a small blue square", "images", 4), Query("row", 5, "images", 3),
               Query("text", "two yellow circles", "texts", 2), Query("row", 7, "texts", 5)]
    together = engine.run(queries)
    for query, found in zip(queries, together):
        alone = engine.run([query])[0]
        assert [f.row for f in found] == [f.row for f in alone]
        assert [f.score for f in found] == pytest.approx([f.score for f in alone], abs=1e-5)
    assert engine.batches == 5 and engine.queries == 8


def test_the_bfloat16_shortlist_gives_the_exact_top_k():
    """Large embedding folders are scored through a bfloat16 copy first, then exactly: the same rows and float32
    scores as scoring every row, also where hundreds of near-duplicates make the shortlist unsure."""
    import torch
    import torch.nn.functional as F

    from multimodal.serve.engine import exact_top_k, shortlist_top_k

    g = torch.Generator().manual_seed(0)
    unit = F.normalize(torch.randn(30_000, 64, generator=g), dim=-1)
    near = F.normalize(unit[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 64, generator=g), dim=-1)
    unit = torch.cat([unit, near])
    queries = torch.cat([F.normalize(torch.randn(6, 64, generator=g), dim=-1), unit[:2]])  # the last two: ties
    found = exact_top_k(queries, unit, unit.to(torch.bfloat16), 10)
    assert set(shortlist_top_k(queries, unit, unit.to(torch.bfloat16), 10)[2]) <= {6, 7}  # the random six: sure
    values, rows = (queries @ unit.T).topk(10, dim=1)
    for hits, v, r, tied in zip(found, values.tolist(), rows.tolist(), [False] * 6 + [True] * 2):
        assert [s for _, s in hits] == pytest.approx(v, abs=1e-6)
        if not tied:  # near-duplicates tie to float32 rounding: their order may differ, not their scores
            assert [row for row, _ in hits] == r


def test_an_index_folder_is_searched_through_faiss(folders, model, tmp_path):
    from multimodal.eval.index import build_index

    build_index(folders["shards"], tmp_path / "index", 1 << 30, log=lambda _: None)
    with client_of(tmp_path / "index", model) as client:
        info = client.get("/api/info").json()
        assert list(info["targets"]) == ["images"] and info["targets"]["images"]["search"].startswith("faiss")
        results = client.get("/api/search", params={"row": 4, "k": 3}).json()["results"]
        assert results[0]["row"] == 4 and results[0]["caption"]
        assert client.get(results[1]["thumbnail"]).headers["content-type"] == "image/jpeg"
        refused = client.get("/api/search", params={"q": "x", "target": "texts"})
        assert refused.status_code == 400 and "holds no texts" in refused.json()["error"]


def one_sentence(response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    sentence = response.json()["error"]
    assert is_sentence(sentence) and "Traceback" not in sentence, sentence
    return sentence


def test_a_few_thousand_malformed_requests_get_one_sentence_each(api):
    """Random and malformed paths, parameters, methods and bodies: a 4xx with one sentence of JSON, never a 500."""
    rng = random.Random(0)
    image = png(Image.new("RGB", (32, 32), "red"))
    bomb = png(Image.new("1", (12000, 12000)))  # ~150 KB on disk, 144 megapixels declared: over the limit
    junk = [b"", b"\x00" * 10, b"GIF89a" + bytes(20), image[:40], b"\xff\xd8\xff\xe0" + os.urandom(200),
            os.urandom(2000), b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4\n", bomb,
            b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc\r\n--x--\r\n"]
    paths = ["/api/search", "/api/thumbnail/0", "/api/thumbnail/-1", "/api/thumbnail/99999999999999",
             "/api/thumbnail/1e3", "/api/thumbnail/%2Fetc%2Fpasswd", "/api/thumbnail/..%2F..%2Fetc%2Fpasswd",
             "/api/../../etc/passwd", "/api/info/x", "/static/../../etc/passwd", "/%00", "/api/search/../info",
             "/api/thumbnail/", "/api/thumbnail/3/../../../../etc/passwd", "/" + "a" * 3000]
    names = ["q", "row", "k", "target", "image", "", "q[]", "k\x00", "\u00e9"]
    values = ["", "0", "-1", "8", "201", "1" * 30, "1.5", "images", "texts", "both", "\x00", "\ud7ff" * 3,
              "a" * 1001, "nan", "0x10", " 8", "%ff", "23", "24"]
    seen = {}
    for _ in range(3000):
        params = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 3))]
        method = rng.choice(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        body = rng.choice(junk) if method != "GET" else None
        headers = rng.choice([{}, {"Content-Type": "image/png"}, {"Content-Type": "multipart/form-data; boundary=x"},
                              {"Content-Type": "multipart/form-data"}, {"Content-Type": "application/json"}])
        response = api.request(method, rng.choice(paths), params=params, content=body, headers=headers)
        if response.status_code >= 400:
            one_sentence(response)
        else:  # a request that happened to be valid
            assert response.status_code == 200 and method in ("GET", "POST"), (method, response.status_code)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
    assert {400, 404, 405}.issubset(seen) and 500 not in seen, seen
    sentences = {one_sentence(api.post("/api/search", content=data, headers={"Content-Type": "image/png"}))
                 for data in (b"not an image at all", bomb, os.urandom(300 << 10))}
    assert any("not an image" in s for s in sentences) and any("pixels" in s for s in sentences)
    assert any("over this server's limit" in s for s in sentences)


def test_thumbnails_are_read_only_from_the_files_the_index_recorded(folders, model, tmp_path):
    """A request names a row, never a path; a file swapped for a link, or for another file, after start-up is
    not read; a row whose record names a file that is not an image gives no bytes of it."""
    photos = image_folder(tmp_path)
    embed("--checkpoint", str(folders["ckpt"]), "--images", str(photos), "--out", str(tmp_path / "emb"), cwd=tmp_path)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(secret)
    with client_of(tmp_path / "emb", model) as client:
        rows = {Path(r["source"]).name: r["row"] for r in client.get("/api/search", params={"q": "x", "k": 6}).json()[
            "results"]}
        assert sorted(rows) == [f"scene{i}.png" for i in range(6)]
        for path in ("/api/thumbnail/..%2Fsecret.png", f"/api/thumbnail/{secret}", "/api/thumbnail/%2Fetc%2Fpasswd",
                     "/api/thumbnail/../../../../etc/passwd", "/api/thumbnail/6", "/api/thumbnail/0x1"):
            assert "root:" not in one_sentence(client.get(path))
        assert client.get(f"/api/thumbnail/{rows['scene2.png']}").status_code == 200
        (photos / "scene0.png").unlink()
        (photos / "scene0.png").symlink_to(secret)
        (photos / "scene1.png").unlink()
        shutil.copy(secret, photos / "scene1.png")  # another file where the recorded one was
        for name in ("scene0.png", "scene1.png"):
            refused = client.get(f"/api/thumbnail/{rows[name]}")
            assert refused.status_code == 404 and "image" in one_sentence(refused)

    crafted = tmp_path / "crafted"  # an embedding folder whose rows name a file that is not an image
    shutil.copytree(tmp_path / "emb", crafted)
    index = next((crafted / "img_index").glob("*.jsonl"))
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    index.write_text("".join(json.dumps({**r, "file_name": str(passwd)}) + "\n" for r in lines))
    with client_of(crafted, model) as client:
        answer = client.get("/api/thumbnail/0")
        assert answer.status_code == 404 and "root:" not in answer.text and "cannot be read" in one_sentence(answer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_token_guards_every_request_and_another_host_is_warned_of(folders):
    """A live server in its own process: the warning for --host 0.0.0.0, 401 without the token, raw garbage
    answered with a 4xx, and Ctrl-C ends it cleanly."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "multimodal", "serve", "--index", str(folders["shards"]),
                             "--host", "0.0.0.0", "--port", "0", "--token", "s3cret"], cwd=folders["root"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit_memory)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://0\.0\.0\.0:(\d+)/#token=s3cret", line)
        assert url, line + proc.stderr.read() if proc.poll() is not None else line
        base = f"http://127.0.0.1:{url.group(1)}"
        assert httpx.get(base + "/").status_code == 200  # the page: a static file, no data
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/api/info", "/api/search?q=a", "/api/thumbnail/0", "/nowhere"):
                refused = httpx.get(base + path, headers=headers)
                assert refused.status_code == 401 and "token" in one_sentence(refused)
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base + "/api/search", params={"q": "a red square"}, headers=good).status_code == 200
        assert httpx.get(base + "/api/thumbnail/0", headers=good).headers["content-type"] == "image/jpeg"
        for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                        b"\x16\x03\x01\x02\x00" + os.urandom(100)):
            with socket.create_connection(("127.0.0.1", int(url.group(1))), timeout=10) as s:
                s.sendall(garbage)
                assert s.recv(100).startswith(b"HTTP/1.1 4")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "warning: --host 0.0.0.0 lets other machines reach this server" in err and "Traceback" not in err


def test_mistakes_stop_the_server_at_start_up_in_one_sentence(folders, tmp_path):
    index = str(folders["shards"])
    empty = tmp_path / "empty"
    empty.mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    wrong_size = tmp_path / "wrong-size"
    shutil.copytree(folders["shards"], wrong_size)
    for kind in ("img", "text"):
        for part in (wrong_size / f"{kind}_emb").glob("*.npy"):
            np.save(part, np.ones((np.load(part).shape[0], 7), np.float16))
    photos = image_folder(tmp_path / "moved")
    embed("--checkpoint", str(folders["ckpt"]), "--images", str(photos), "--out", str(tmp_path / "emb"), cwd=tmp_path)
    photos.rename(tmp_path / "elsewhere")
    cases = [(["--index", str(empty)], "is neither an embedding folder"),
             (["--index", str(tmp_path / "none")], "does not exist"),
             (["--index", index, "--port", str(taken.getsockname()[1])], "is in use"),
             (["--index", index, "--port", "70000"], "--port must be"),
             (["--index", index, "--token", "two words"], "--token (or MULTIMODAL_SERVE_TOKEN) must be"),
             (["--index", str(wrong_size), "--port", str(free_port())], "gives 128-d embeddings"),
             (["--index", str(tmp_path / "emb"), "--port", str(free_port())], "are gone from where")]
    try:
        for args, expected in cases:
            proc = run_cli("serve", *args, cwd=tmp_path, timeout=120, memory=MEMORY_LIMIT)
            assert proc.returncode == 2, (args, proc.stdout, proc.stderr[-2000:])
            lines = proc.stderr.strip().splitlines()
            assert expected in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
            assert lines[-1].startswith("error: ") and is_sentence(lines[-1]), lines
    finally:
        taken.close()
