// The playground calls the public API exactly as any client does: POST v1/best-of-n, with the key the user
// typed as a bearer token. Server text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STATUS_TEXT = {
  400: "Bad request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not found",
  413: "Payload too large",
  429: "Too many requests",
  500: "Internal server error",
  501: "Not implemented",
  503: "Service unavailable",
  504: "Gateway timeout",
};
const HINTS = {
  401: "This server needs an API key: enter it in the API key field.",
  413: "The request is over the server's size limit (RLAIFV_MAX_BODY_BYTES): send a smaller image.",
  503: "The model is not ready yet: try again in a few seconds.",
  504: "The request ran past the server's deadline (RLAIFV_REQUEST_TIMEOUT_S): try a smaller N or max tokens.",
};

let image = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits) {
  return Number(value).toFixed(digits);
}

function setImage(dataUrl, label) {
  image = dataUrl;
  const preview = $("preview");
  preview.src = dataUrl;
  preview.hidden = false;
  const encoded = dataUrl.slice(dataUrl.indexOf(",") + 1);
  const bytes = (encoded.length * 3) / 4 - (encoded.match(/=*$/)[0].length || 0);
  const size = bytes < 1024 ? `${bytes} B` : `${(bytes / 1024).toFixed(1)} KiB`;
  $("image-info").textContent = `${label} · ${size}`;
}

function readImage(blob, label) {
  if (!blob.type.startsWith("image/")) {
    showError(null, `${label} is not an image (${blob.type || "unknown type"}).`);
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => {
      setImage(reader.result, label);
      resolve();
    };
    reader.onerror = () => {
      showError(null, `could not read ${label}.`);
      resolve();
    };
    reader.readAsDataURL(blob);
  });
}

async function loadSample() {
  const res = await fetch("playground/sample.png");
  if (res.ok) await readImage(await res.blob(), "sample scene (shapes world)");
}

async function loadModel() {
  const key = $("api-key").value.trim();
  try {
    const res = await fetch("v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (!res.ok) return;
    const card = (await res.json()).data[0];
    $("model").textContent = `model ${card.id} · default reward ${card.reward.mode}, β=${card.reward.beta}`;
  } catch {
    // The model name is a nicety; the request itself reports any problem.
  }
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  delete box.dataset.status;
}

function showError(status, message, detail) {
  const box = $("error");
  box.dataset.status = status === null ? "client" : String(status);
  $("error-title").textContent =
    status === null ? "Error" : `HTTP ${status} ${STATUS_TEXT[status] || ""}`.trim();
  $("error-message").textContent = message;
  let hint = status === null ? "" : HINTS[status] || "";
  if (status === 401 && detail && detail.code === "invalid_api_key") {
    hint = "The server did not accept this API key.";
  }
  if (status === 429) {
    const wait = detail && detail.retryAfter ? ` Retry after ${detail.retryAfter} s.` : "";
    hint = `The server is busy or this client is over its rate limit.${wait}`;
  }
  if (detail && detail.code) hint = `${hint} (code: ${detail.code})`.trim();
  $("error-hint").textContent = hint;
  box.hidden = false;
}

function requestBody() {
  const sampling = { temperature: Number($("temperature").value || 1) };
  const maxTokens = $("max-tokens").value;
  const seed = $("seed").value;
  if (maxTokens) sampling.max_tokens = Number(maxTokens);
  if (seed) sampling.seed = Number(seed);
  return {
    images: [image],
    question: $("question").value,
    n: Number($("n").value || 1),
    sampling,
    reward: { mode: $("mode").value },
  };
}

async function submit(event) {
  event.preventDefault();
  clearError();
  $("results").hidden = true;
  if (!image) {
    showError(null, "choose, drop or paste an image first.");
    return;
  }
  const body = requestBody();
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const button = $("submit");
  button.disabled = true;
  $("status").textContent = `Sampling ${body.n} candidate${body.n === 1 ? "" : "s"}…`;
  const started = performance.now();
  try {
    const res = await fetch("v1/best-of-n", { method: "POST", headers, body: JSON.stringify(body) });
    const text = await res.text();
    let payload = null;
    try {
      payload = JSON.parse(text);
    } catch {
      payload = null;
    }
    if (!res.ok) {
      const err = payload && payload.error ? payload.error : {};
      showError(res.status, err.message || text || res.statusText, {
        code: err.code,
        retryAfter: res.headers.get("Retry-After"),
      });
      $("status").textContent = "";
      return;
    }
    render(payload, (performance.now() - started) / 1000);
    $("status").textContent = "";
  } catch (exc) {
    showError(null, `could not reach the server: ${exc.message}`);
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

function summaryItem(list, term, value) {
  list.append(el("dt", "", term), el("dd", "", value));
}

function render(result, roundTrip) {
  const summary = $("summary");
  summary.replaceChildren();
  const info = result.reward;
  const mode = info.mode === "dpo" ? "implicit" : info.mode;
  const extra = info.claim_score ? `, ${info.claim_score}` : "";
  const t = result.timings;
  summaryItem(summary, "model", result.model);
  summaryItem(summary, "reward", `${mode} (β=${info.beta}, ${info.normalize}${extra})`);
  summaryItem(summary, "chosen", `sample ${result.best_index} of ${result.candidates.length}`);
  summaryItem(
    summary,
    "timings",
    `queue ${fmt(t.queue_s, 3)} s · generate ${fmt(t.generate_s, 3)} s · score ${fmt(t.score_s, 3)} s · ` +
      `server ${fmt(t.total_s, 3)} s · round trip ${fmt(roundTrip, 3)} s`,
  );
  summaryItem(
    summary,
    "tokens",
    `${result.usage.prompt_tokens} prompt + ${result.usage.completion_tokens} generated`,
  );

  const rewards = result.candidates.map((c) => c.reward);
  const low = Math.min(...rewards);
  const high = Math.max(...rewards);
  const ranked = [...result.candidates].sort((a, b) => b.reward - a.reward || a.index - b.index);
  const list = $("candidates");
  list.replaceChildren(...ranked.map((c, rank) => candidateItem(c, rank, c.index === result.best_index, low, high)));
  $("results").hidden = false;
}

function candidateItem(c, rank, chosen, low, high) {
  const item = el("li", chosen ? "candidate best" : "candidate");
  item.dataset.index = String(c.index);
  item.dataset.reward = String(c.reward);
  if (chosen) item.setAttribute("aria-current", "true");

  const head = el("div", "head");
  head.append(el("span", "rank", `#${rank + 1}`), el("span", "sample", `sample ${c.index}`));
  if (chosen) head.append(el("span", "badge", "chosen"));
  head.append(el("span", "finish muted", c.finish_reason));
  item.append(head, el("p", "text", c.text));

  const bar = el("div", "bar");
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-valuemin", String(low));
  bar.setAttribute("aria-valuemax", String(high));
  bar.setAttribute("aria-valuenow", String(c.reward));
  bar.setAttribute("aria-label", `reward of sample ${c.index}`);
  const fill = el("div", "fill");
  fill.style.width = `${high > low ? 4 + (96 * (c.reward - low)) / (high - low) : 100}%`;
  bar.append(fill);
  item.append(bar);

  const stats = el("dl", "stats");
  const stat = (term, value, className) => stats.append(el("dt", "", term), el("dd", className || "", value));
  stat("reward", fmt(c.reward, 4), "reward-value");
  stat("implicit", fmt(c.implicit_reward, 4), "implicit-value");
  stat("Σ log π", fmt(c.policy_logprob, 3), "policy-value");
  stat("Σ log π_ref", fmt(c.reference_logprob, 3), "reference-value");
  stat("T", String(c.num_tokens), "tokens-value");
  item.append(stats);

  if (c.claims) item.append(claimsTable(c.claims));
  return item;
}

function claimsTable(claims) {
  const table = el("table", "claims");
  const head = el("tr");
  for (const name of ["claim", "p(yes)", "verdict"]) head.append(el("th", "", name));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  if (claims.length === 0) {
    const row = el("tr");
    const cell = el("td", "muted", "no claims found in this answer");
    cell.colSpan = 3;
    row.append(cell);
    table.tBodies[0].append(row);
  }
  for (const claim of claims) {
    const row = el("tr", claim.accepted ? "accepted" : "rejected");
    const text = el("td", "claim", claim.claim);
    text.title = claim.question;
    const verdict = claim.accepted ? "✓ accepted" : "✗ rejected";
    row.append(
      text,
      el("td", "p-yes", fmt(claim.p_yes, 3)),
      el("td", "verdict", claim.repeated ? `${verdict} · repeated` : verdict),
    );
    table.tBodies[0].append(row);
  }
  return table;
}

function init() {
  $("form").addEventListener("submit", submit);
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) readImage(file, file.name);
  });
  $("sample").addEventListener("click", loadSample);
  $("api-key").addEventListener("change", loadModel);
  document.addEventListener("paste", (event) => {
    for (const item of event.clipboardData ? event.clipboardData.items : []) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        event.preventDefault();
        readImage(item.getAsFile(), "pasted image");
        return;
      }
    }
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) readImage(file, file.name);
  });
  drop.addEventListener("click", () => $("file").click());
  loadModel();
  loadSample().finally(() => document.body.classList.add("ready"));
}

init();
