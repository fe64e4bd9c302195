"""Screenshots of the MLflow UI for a finished `moekd run`: the parent run (its description and datasets), its
accuracy-against-size plot, the models compared side by side, and the registered model. Starts `mlflow server` on
127.0.0.1 over the run's tracking store, opens each page in headless Chromium (Debian's `chromium`), saves PNGs
(256 colours), and stops the server.

    python docs/mlflow_screenshots.py --tracking-uri sqlite:///mlruns.db --out docs/img [--run RUN_ID]

Without --run: the newest run that has no parent. The registered model is the one its student was registered as.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from moekd_ray import process_group
from moekd_ray.process_group import LOOPBACK as HOST, free_port


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    if process_group.wait_http(url, proc, timeout_s) is None:
        raise SystemExit(f"mlflow_screenshots: the MLflow server did not answer {url} in {timeout_s:.0f} s")


def api(base: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def screenshot(browser: str, url: str, path: Path, size: str = "1600,1000") -> None:
    # --virtual-time-budget lets the single-page app fetch and render before the picture is taken.
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    from PIL import Image  # (matplotlib's dependency) 256 colours: a third of the bytes, the same to read

    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}  <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the run's store, e.g. sqlite:///mlruns.db")
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs (default: docs/img)")
    parser.add_argument("--run", help="the parent run's id (default: the newest run without a parent)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("mlflow_screenshots: no chromium on PATH; install it (Debian: apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
                               "--host", HOST, "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://{HOST}:{port}"
    try:
        wait_http(f"{base}/health", server)
        experiments = [e["experiment_id"] for e in api(base, "experiments/search", {"max_results": 100})["experiments"]]
        runs = api(base, "runs/search", {"experiment_ids": experiments, "max_results": 1000,
                                         "order_by": ["attributes.start_time DESC"]})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parent = next(r for r in runs if (r["info"]["run_id"] == args.run if args.run
                                          else "mlflow.parentRunId" not in tags[r["info"]["run_id"]]))
        pid, eid = parent["info"]["run_id"], parent["info"]["experiment_id"]
        evaluate = next(r for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == pid
                        and r["info"]["run_name"] == "evaluate")
        models = [r["info"]["run_id"] for r in runs
                  if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == evaluate["info"]["run_id"]]
        # Its overview: the description (the final table), the datasets it used, tags, metrics, stage runs.
        screenshot(browser, f"{base}/#/experiments/{eid}/runs/{pid}", out / "mlflow_parent_run.png", "1600,1500")
        screenshot(browser, f"{base}/#/experiments/{eid}/runs/{pid}/artifactPath/accuracy_vs_size.png",
                   out / "mlflow_accuracy_vs_size.png", "1600,1100")
        compare = urllib.parse.quote(json.dumps(models))
        screenshot(browser, f"{base}/#/compare-runs?runs={compare}&experiments={urllib.parse.quote(json.dumps([eid]))}",
                   out / "mlflow_model_comparison.png", "1600,1400")
        versions = api(base, "model-versions/search", query={"filter": f"run_id='{pid}'"}).get("model_versions", [])
        if versions:
            name, version = versions[0]["name"], versions[0]["version"]
            screenshot(browser, f"{base}/#/models/{urllib.parse.quote(name)}/versions/{version}",
                       out / "mlflow_registered_model.png")
        else:
            print(f"run {pid} registered no model: no registry screenshot")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow's helper processes with it
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
