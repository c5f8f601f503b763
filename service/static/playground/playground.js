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
  502: "Bad gateway",
  503: "Service unavailable",
  504: "Gateway timeout",
};
// What to do, by status; CODE_HINTS (by the error's `code`, service/errors.py) win where one status has causes
// that call for different advice.
const HINTS = {
  401: "This server needs an API key: enter it in the API key field.",
  413: "The request is over the server's size limit (RLAIFV_MAX_BODY_BYTES): send a smaller image.",
  429: "The server is busy or this client is over its rate limit.",
  502: "A proxy or gateway in front of the service got no valid answer from it: the service may be down or restarting.",
  503: "The service cannot take requests right now: try again later.",
  504: "The request ran past the server's deadline (RLAIFV_REQUEST_TIMEOUT_S): try a smaller N or max tokens.",
};
const CODE_HINTS = {
  invalid_api_key: "The server did not accept this API key.",
  queue_full: "The server's queue is full: try again shortly.",
  rate_limited: "This API key is over its rate limit (RLAIFV_RATE_LIMIT_PER_MINUTE).",
  not_ready: "The model is not ready yet: try again in a few seconds.",
  shutting_down: "The server is shutting down: try again in a moment.",
  generator_unavailable:
    "The generator model (RLAIFV_GENERATOR_URL) is unreachable, timed out or overloaded: try again later.",
  engine_unavailable: "A vLLM server of the engine (RLAIFV_ENGINE=vllm) is unreachable or overloaded: try again later.",
  redis_unavailable: "Redis (RLAIFV_REDIS_URL) is unreachable or still loading: try again later.",
  generator_error: "The generator model answered, but not usefully: tell the server's operator.",
  generator_auth: "The generator model refused this server's key: tell the server's operator.",
};
// Titles of the errors that carry no HTTP status: bad input (never sent), no answer at all, no answer in time, an
// answer the page cannot use.
const KIND_TITLES = { client: "Error", network: "Network error", timeout: "Timed out", answer: "Unexpected answer" };
// The server answers 504 itself after RLAIFV_REQUEST_TIMEOUT_S (120 s by default): the page waits a little longer,
// so that answer comes first, and gives up only on a server or proxy that never answers.
const REQUEST_LIMIT_MS = 150_000;
// How long a submit waits for the model card (which decides whether an image goes with the question) before it
// sends with what the page knows; a card fetch is given up after as long.
const CARD_LIMIT_MS = 10_000;
// While the server loads its model (/v1/models answers 503), the card is asked again after Retry-After seconds,
// kept between these bounds, until it comes.
const CARD_RETRY_S = { min: 1, max: 30, fallback: 5 };
// The formats this page can send, by the server's (PIL) names, with the magic bytes that tell them apart when the
// browser gives a file no type (an unknown extension); `type` is what the data URL says. A browser decodes these, so
// a damaged file is refused here. What the server takes of them comes with the model card (`image_limits`);
// until a card comes, the server's defaults. SVG, TIFF, HEIC... are never sent from here.
const PAGE_FORMATS = new Map([
  ["PNG", { type: "image/png", name: "PNG", magic: [[0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]] }],
  ["JPEG", { type: "image/jpeg", name: "JPEG", magic: [[0xff, 0xd8, 0xff]] }],
  [
    "WEBP",
    { type: "image/webp", name: "WebP", magic: [[0x52, 0x49, 0x46, 0x46, -1, -1, -1, -1, 0x57, 0x45, 0x42, 0x50]] },
  ],
  ["GIF", { type: "image/gif", name: "GIF", magic: [[0x47, 0x49, 0x46, 0x38]] }],
  ["BMP", { type: "image/bmp", name: "BMP", magic: [[0x42, 0x4d]] }],
]);
const DEFAULT_LIMITS = { formats: ["PNG", "JPEG", "WEBP", "GIF", "BMP"], max_bytes: 0, max_pixels: 0, max_aspect: 0 };
// What the server's seed takes: a 64-bit signed integer, at least 0 (2^63 - 1 is past a JS number's exact range).
const MAX_SEED = 2n ** 63n - 1n;
// An HTTP header value must be Latin-1, and a bearer token is printable ASCII: fetch would throw on anything else.
const KEY_PATTERN = /^[\x21-\x7e]+$/;
const KEY_MESSAGE =
  "the API key may hold only printable ASCII characters, without spaces: check it for a pasted quote or a " +
  "letter that is not ASCII.";
const ENTITIES = { amp: "&", lt: "<", gt: ">", quot: '"', "#39": "'", nbsp: " " };

// The inputs of the API's request fields, for the `param` of an error (`images[0]` goes by `images`). A Map, so
// that a `param` such as "constructor" finds nothing.
const PARAM_FIELDS = new Map([
  ["images", "file"],
  ["question", "question"],
  ["n", "n"],
  ["sampling.temperature", "temperature"],
  ["sampling.max_tokens", "max-tokens"],
  ["sampling.seed", "seed"],
  ["reward.mode", "mode"],
]);
const NO_IMAGE_YET = "choose, drop or paste an image first, or press No image to ask without one.";
const CLAIMS_NEED_AN_IMAGE =
  "the claims reward checks each claim against the image: choose, drop or paste one, or pick the implicit reward.";

// Input the page refuses before sending anything; `field` is the id of the input to fix.
class InputError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

let image = null; // the data URL #preview shows: the image a request sends, never another
let imageLabel = ""; // what that image is called (its file name, "sample scene"...)
let loadSeq = 0; // number of the newest image load: an older one that finishes later is dropped
let imageLoad = Promise.resolve(); // the newest image load, which a submit waits for
let inputFile = null; // the file input's File whose image is shown, if the image came from the input
let busy = false; // a request is running: the button stays focusable but submits are ignored
// What the model reads, from its card's `input_modalities`: images until the card says otherwise (a server with
// keys shows the card only once the key is entered; a loading server only once it is loaded).
let readsImages = true;
let cardApplied = false; // a card was applied, so readsImages is the model's; until then a submit fetches it first
let noImage = false; // the user chose to ask without an image (No image): only then is a missing image no error
let modelLoad = Promise.resolve(); // the newest model card fetch
let cardFetch = null; // the card fetch in flight, if any, which a submit without a card waits for
let cardSeq = 0; // number of the newest card fetch: an older one (another key's) that ends later is dropped
let cardRetry = 0; // the timer of the next card fetch while the server loads its model
let request = null; // the AbortController of the running submit: Cancel, Escape and the time limit abort it
// The image limits of the served model's card (0: not known, checked by the server alone); until a card comes, the
// defaults. An image taken before the card is checked again against the card's (`recheckImage`).
let imageLimits = DEFAULT_LIMITS;
let imageBlob = null; // the checked blob of the image on show, to check again against other limits
let imageCheckedWith = null; // the limits it was checked against
let imageSeq = 0; // the number of the load that set the image on show

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
  imageLabel = label;
  noImage = false;
  const preview = $("preview");
  preview.src = dataUrl;
  preview.hidden = false;
  const encoded = dataUrl.slice(dataUrl.indexOf(",") + 1);
  const bytes = (encoded.length * 3) / 4 - (encoded.match(/=*$/)[0].length || 0);
  const size = bytes < 1024 ? `${bytes} B` : `${(bytes / 1024).toFixed(1)} KiB`;
  $("image-info").textContent = `${label} · ${size}`;
  clearError(); // an error about an earlier image (or request) no longer applies
}

// No image on show or sent; a load still running is dropped.
function clearImage(info) {
  loadSeq++;
  image = null;
  imageBlob = null;
  imageCheckedWith = null;
  imageLabel = "";
  inputFile = null;
  noImage = false;
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  $("image-info").textContent = info;
  $("file").value = "";
}

// A load that failed or was refused leaves no image: a request never sends one the user meant to replace (nor
// none at all: a missing image is an error until the user presses No image).
function dropImage(message) {
  clearImage("no image");
  showError("client", message, undefined, [{ message, field: "file" }]);
}

// The No image button: ask without an image (image models take none with the implicit reward).
function chooseNoImage() {
  clearImage("no image: the question is asked without one");
  noImage = true;
  clearError();
}

// The page as the model's card says: a text-only model gets no image picker, no image and no claims reward (which
// needs an image). A card without the field is a server from before it, which served image models.
function applyModalities(card) {
  const modalities = Array.isArray(card.input_modalities) ? card.input_modalities : ["text", "image"];
  readsImages = modalities.includes("image");
  $("image-picker").hidden = !readsImages;
  $("text-only").hidden = readsImages;
  const mode = $("mode");
  mode.querySelector('option[value="claims"]').disabled = !readsImages;
  if (!readsImages) {
    if (mode.value === "claims") mode.value = "dpo";
    clearImage(""); // and a load still running
  }
}

// The card's image limits applied: what the file input offers, and what a loaded image is checked against. A card
// without them (a server from before them) is a server with the default formats.
function applyImageLimits(card) {
  const limits = card.image_limits && typeof card.image_limits === "object" ? card.image_limits : {};
  const formats = Array.isArray(limits.formats) ? limits.formats.filter((f) => typeof f === "string") : [];
  const number = (value) => (Number.isFinite(value) && value > 0 ? value : 0);
  imageLimits = {
    formats: formats.length ? formats : DEFAULT_LIMITS.formats,
    max_bytes: number(limits.max_bytes),
    max_pixels: number(limits.max_pixels),
    max_aspect: number(limits.max_aspect),
  };
  $("file").setAttribute("accept", [...sendableTypes(imageLimits)].join(","));
  const previous = imageLoad;
  const check = recheckImage();
  imageLoad = Promise.all([previous, check]); // a submit waits for the check as for a load
}

// The data-URL types this page sends under `limits`: those of its formats the limits name, in the page's order.
function sendableTypes(limits) {
  return new Set([...PAGE_FORMATS].filter(([f]) => limits.formats.includes(f)).map(([, { type }]) => type));
}

// The image on show checked again when it was checked against other limits (taken before the card came): a submit
// never sends what the server refuses. True if it passes; else it is dropped, the reason shown.
async function recheckImage() {
  const blob = imageBlob;
  const limits = imageLimits;
  if (!blob || imageCheckedWith === limits) return true;
  if (imageSeq !== loadSeq) return true; // a load running now replaces the image, checked against these limits
  const seq = loadSeq; // a load started meanwhile replaces the image: this check then drops nothing
  const label = imageLabel;
  try {
    await checkedImage(blob, label, limits);
  } catch (exc) {
    if (seq === loadSeq) dropImage(exc instanceof InputError ? exc.message : `could not read ${label}: ${exc.message}`);
    return false;
  }
  if (seq === loadSeq) imageCheckedWith = limits;
  return true;
}

// What to send instead, for the message about a file the server does not take (the formats the server takes
// that this page cannot send are named as the API's), in the page's order: PNG first.
function formatsToSend(limits) {
  const names = (list) => (list.length > 1 ? `${list.slice(0, -1).join(", ")} or ${list[list.length - 1]}` : list[0]);
  const types = sendableTypes(limits);
  const sendable = [...PAGE_FORMATS.values()].filter(({ type }) => types.has(type)).map(({ name }) => name);
  const others = limits.formats.filter((f) => !PAGE_FORMATS.has(f));
  const api = others.length
    ? ` (the server also takes ${names(others)}, which this page cannot show: use the API)`
    : "";
  return sendable.length ? `send ${names(sendable)}${api}.` : `this page can send none of them${api}.`;
}

// The type of the page's formats whose magic bytes start `head` (a Uint8Array), or "".
function sniffType(head) {
  for (const { type, magic } of PAGE_FORMATS.values()) {
    if (magic.some((bytes) => bytes.length <= head.length && bytes.every((b, i) => b < 0 || head[i] === b))) {
      return type;
    }
  }
  return "";
}

function formatOf(type) {
  for (const format of PAGE_FORMATS.values()) if (format.type === type) return format;
  return undefined;
}

// The blob as an image the server takes, typed by its content (the browser guesses by the file's extension:
// a PNG named .heic is a PNG, a text file named .png is no image), within the card's size limits. A blob that does
// not decode is refused here, not sent for the server's 400.
async function checkedImage(blob, label, limits) {
  const sniffed = sniffType(new Uint8Array(await blob.slice(0, 16).arrayBuffer()));
  const type = sniffed || blob.type;
  if (!type.startsWith("image/")) throw new InputError(`${label} is not an image (${blob.type || "unknown type"}).`);
  const known = formatOf(type);
  if (!known || !sendableTypes(limits).has(type)) {
    throw new InputError(`${label} is ${type}, which the server does not take: ${formatsToSend(limits)}`);
  }
  const { max_bytes: maxBytes, max_pixels: maxPixels, max_aspect: maxAspect } = limits;
  if (maxBytes && blob.size > maxBytes) {
    const size = blob.size.toLocaleString("en");
    throw new InputError(`${label} is ${size} bytes, over the server's limit of ${maxBytes.toLocaleString("en")}.`);
  }
  const typed = blob.type === type ? blob : new Blob([blob], { type }); // the data URL then names the real type
  let width;
  let height;
  try {
    const bitmap = await createImageBitmap(typed);
    ({ width, height } = bitmap);
    bitmap.close();
  } catch {
    throw new InputError(`${label} could not be decoded as ${known.name}: the file is damaged or not an image.`);
  }
  if (maxPixels && width * height > maxPixels) {
    const limit = maxPixels.toLocaleString("en");
    throw new InputError(`${label} is ${width}x${height} pixels, over the server's limit of ${limit} pixels.`);
  }
  if (maxAspect && Math.max(width, height) / Math.min(width, height) > maxAspect) {
    throw new InputError(`${label} is ${width}x${height}: one side is over ${maxAspect} times the other.`);
  }
  return typed;
}

function readDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("read failed"));
    reader.readAsDataURL(blob);
  });
}

// Every image load (file, drop, paste, sample) goes through here: it takes a number, and applies its result
// only if no newer load started meanwhile, so a slow sample never replaces a file picked after it. The file
// input names a file only while that file's image is the one shown; clearing it otherwise also lets picking
// the same file again fire a change event.
function loadImage(source, label, fromInput) {
  const seq = ++loadSeq;
  noImage = false;
  inputFile = fromInput ? source : null;
  if (!fromInput) $("file").value = "";
  const task = (async () => {
    let dataUrl;
    let limits;
    let typed;
    try {
      const blob = await source;
      if (seq !== loadSeq) return;
      limits = imageLimits;
      typed = await checkedImage(blob, label, limits);
      dataUrl = await readDataUrl(typed);
    } catch (exc) {
      if (seq === loadSeq) {
        dropImage(exc instanceof InputError ? exc.message : `could not read ${label}: ${exc.message}`);
      }
      return;
    }
    if (seq !== loadSeq) return;
    setImage(dataUrl, label);
    imageSeq = seq;
    imageBlob = typed;
    imageCheckedWith = limits;
    if (limits !== imageLimits) await recheckImage(); // the card came while this image was checked
  })();
  imageLoad = task;
  return task;
}

async function sampleBlob() {
  const res = await fetch("playground/sample.png");
  if (!res.ok) throw new InputError(`could not load the sample scene (HTTP ${res.status}).`);
  return res.blob();
}

function loadSample() {
  return loadImage(sampleBlob(), "sample scene (shapes world)", false);
}

// The image once every load started so far has settled (a load may start while another is awaited).
async function currentImage() {
  let task;
  do {
    task = imageLoad;
    await task;
  } while (task !== imageLoad);
  return image;
}

function readKey() {
  const key = $("api-key").value.trim();
  if (key && !KEY_PATTERN.test(key)) throw new InputError(KEY_MESSAGE, "api-key");
  return key;
}

// Fetches the card (again: a new key, a submit without a card, the next try while the server loads).
function loadModel() {
  clearTimeout(cardRetry);
  const seq = ++cardSeq;
  const task = fetchModel(seq).finally(() => {
    if (cardFetch === task) cardFetch = null;
  });
  cardFetch = task;
  modelLoad = task;
  return task;
}

// The live status beside the button; `fromCard` marks text about the card, which the card's arrival replaces
// (and a request's own status never is).
function setStatus(text, fromCard) {
  const status = $("status");
  status.textContent = text;
  if (fromCard) status.dataset.card = "";
  else delete status.dataset.card;
}

// The note under the API key field when the card is refused (401), the field marked and described by it; null
// clears both.
function setKeyNote(text) {
  const note = $("key-note");
  note.textContent = text || "";
  note.hidden = !text;
  const input = $("api-key");
  if (text) markField("api-key", "key-note");
  else if (input.getAttribute("aria-describedby") === "key-note") unmarkField(input);
}

function retrySeconds(retryAfter) {
  const s = Number.parseInt(retryAfter || "", 10);
  return Math.min(CARD_RETRY_S.max, Math.max(CARD_RETRY_S.min, Number.isFinite(s) ? s : CARD_RETRY_S.fallback));
}

async function fetchModel(seq) {
  let key;
  try {
    key = readKey();
  } catch (exc) {
    showError("client", exc.message, undefined, [{ message: exc.message, field: exc.field }]);
    return;
  }
  if (!$("error").hidden && $("error-message").textContent === KEY_MESSAGE) clearError();
  // A card fetch that hangs is given up, so that a submit waiting for it goes on.
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), CARD_LIMIT_MS);
  let res;
  let payload;
  try {
    res = await fetch("v1/models", {
      headers: key ? { Authorization: `Bearer ${key}` } : {},
      signal: controller.signal,
    });
    payload = await res.json();
  } catch {
    // the card is a nicety (name, what the model reads): the request itself reports any problem
  } finally {
    clearTimeout(timer);
  }
  if (seq !== cardSeq || !res) return;
  if (res.status === 401) {
    // The model line was this server's under another key: the new one is refused, so it no longer holds.
    $("model").textContent = "";
    const code = payload && payload.error && payload.error.code;
    setKeyNote(
      code === "invalid_api_key" || (code !== "missing_api_key" && key)
        ? "This key is not valid."
        : "This server needs an API key.",
    );
    return;
  }
  if (res.status === 503 && !cardApplied) {
    const wait = retrySeconds(res.headers.get("Retry-After"));
    if (!busy) setStatus(`The server is loading the model: asking again in ${wait} s…`, true);
    cardRetry = setTimeout(() => seq === cardSeq && loadModel(), wait * 1000);
    return;
  }
  const card = res.ok && payload && Array.isArray(payload.data) ? payload.data[0] : undefined;
  if (!card || typeof card !== "object") return;
  setKeyNote(null);
  applyModalities(card);
  applyImageLimits(card);
  cardApplied = true;
  const reward = card.reward || {};
  $("model").textContent = `model ${card.id} · default reward ${reward.mode}, β=${reward.beta}`;
  if ("card" in $("status").dataset) setStatus("The model is loaded.");
}

// The error box's problems marked on their inputs: aria-invalid, and aria-describedby naming the problem's text
// (an input's own description, if it had one, is put back by clearMarks).
function markField(id, describedBy) {
  const input = id && $(id);
  if (!input) return;
  input.setAttribute("aria-invalid", "true");
  if (input.dataset.describedBy === undefined) input.dataset.describedBy = input.getAttribute("aria-describedby") || "";
  input.setAttribute("aria-describedby", describedBy);
}

function unmarkField(input) {
  input.removeAttribute("aria-invalid");
  if (input.dataset.describedBy === undefined) return;
  if (input.dataset.describedBy) input.setAttribute("aria-describedby", input.dataset.describedBy);
  else input.removeAttribute("aria-describedby");
  delete input.dataset.describedBy;
}

// The marks of the error box's problems; the key note's mark stays while the note does.
function clearMarks() {
  for (const input of document.querySelectorAll("[aria-invalid]")) unmarkField(input);
  if (!$("key-note").hidden) markField("api-key", "key-note");
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  delete box.dataset.status;
  $("error-list").replaceChildren();
  clearMarks();
}

// The input of an API `param` ("sampling.max_tokens", "images[0]"), or null.
function paramField(param) {
  if (typeof param !== "string") return null;
  return PARAM_FIELDS.get(/^images(\[|$)/.test(param) ? "images" : param) || null;
}

// The problems of an error answer: each of `error.errors` when the server listed several, else the one.
function answerProblems(err, message) {
  const listed = Array.isArray(err.errors) ? err.errors.filter((e) => e && typeof e === "object") : [];
  if (listed.length < 2) return [{ message, field: paramField(err.param) }];
  return listed.map((e) => ({
    message: typeof e.message === "string" && e.message ? e.message : "(no details)",
    field: paramField(e.param),
  }));
}

// "N problems:" above the list; the server lists at most 50 and its message counts the rest ("(and 60 more
// problems; the first 50 are listed)").
function problemsHeading(count, message) {
  const more = /\(and (\d+) more problems?; the first \d+ are listed\)$/.exec(message || "");
  const total = more ? Number(more[1]) + 1 : count;
  return total > count ? `${total} problems; the first ${count}:` : `${count} problems:`;
}

function retryHint(retryAfter) {
  if (!retryAfter) return "";
  return /^\d+$/.test(retryAfter.trim()) ? ` Retry after ${retryAfter.trim()} s.` : ` Retry after ${retryAfter}.`;
}

// `status` is the HTTP status, or a kind of error that has none (KIND_TITLES). `problems` ({message, field}, field
// the id of the input it is about, or null): two or more are listed one by one under `message`; each one's input
// is marked (aria-invalid) and described by its text.
function showError(status, message, detail, problems) {
  const box = $("error");
  const http = typeof status === "number";
  clearMarks();
  box.dataset.status = String(status);
  $("error-title").textContent = http ? `HTTP ${status} ${STATUS_TEXT[status] || ""}`.trim() : KIND_TITLES[status];
  $("error-message").textContent = message;
  const list = $("error-list");
  const many = Boolean(problems) && problems.length > 1;
  list.replaceChildren();
  list.hidden = !many;
  for (const [i, problem] of (problems || []).entries()) {
    if (many) {
      const item = el("li", "", problem.message);
      item.id = `problem-${i}`;
      list.append(item);
    }
    markField(problem.field, many ? `problem-${i}` : "error-message");
  }
  let hint = (!http && detail && detail.hint) || "";
  if (http) {
    const code = detail && detail.code;
    hint = (code && CODE_HINTS[code]) || HINTS[status] || "";
    if (status === 429 || status === 503) hint += retryHint(detail && detail.retryAfter);
    if (code) hint = `${hint} (code: ${code})`;
  }
  $("error-hint").textContent = hint.trim();
  box.hidden = false;
}

// A body that is not the API's JSON (a proxy's HTML error page, say) is shown as short plain text: its <title>,
// or its text without tags, whitespace collapsed, at most 200 characters; set with textContent like the rest.
function plainText(text, contentType) {
  let plain = text || "";
  if (/html/i.test(contentType || "") || /^\s*</.test(plain)) {
    const title = /<title[^>]*>([\s\S]*?)<\/title>/i.exec(plain);
    plain =
      title && title[1].trim()
        ? title[1]
        : plain.replace(/<(script|style)\b[\s\S]*?<\/\1\s*>/gi, " ").replace(/<[^>]*>/g, " ");
    plain = plain.replace(/&(amp|lt|gt|quot|#39|nbsp);/g, (_, name) => ENTITIES[name]);
  }
  plain = plain.replace(/\s+/g, " ").trim();
  return plain.length > 200 ? `${plain.slice(0, 199)}…` : plain;
}

// An empty field is left out of the request, so the server's default applies. A value the field cannot parse
// (the browser then reports "" with validity.badInput) or one out of range is refused here, before sending.
function numberField(id, name, rule, valid) {
  const input = $(id);
  const refuse = () => new InputError(`${name} must be ${rule}, or empty for the server's default.`, id);
  if (input.validity.badInput) throw refuse();
  if (input.value.trim() === "") return undefined;
  const value = Number(input.value);
  if (!Number.isFinite(value) || !valid(value)) throw refuse();
  return value;
}

// The request, or every problem of the form in its order (`problems` gets an InputError each), as the server
// lists several: fixing one at a time would take a submit each.
function requestBody(dataUrl, problems) {
  const check = (fn) => {
    try {
      return fn();
    } catch (exc) {
      if (!(exc instanceof InputError)) throw exc;
      problems.push(exc);
      return undefined;
    }
  };
  const mode = $("mode").value;
  if (readsImages && !dataUrl) {
    // Without an image the API takes only the implicit reward (claims are checked against the image).
    if (mode === "claims") problems.push(new InputError(CLAIMS_NEED_AN_IMAGE, "mode"));
    else if (!noImage) problems.push(new InputError(NO_IMAGE_YET, "file"));
  }
  const question = $("question").value;
  if (!question.trim()) problems.push(new InputError("the question must not be empty.", "question"));
  const whole = (min) => (v) => Number.isSafeInteger(v) && v >= min;
  const n = check(() => numberField("n", "N", "a whole number of at least 1", whole(1)));
  const sampling = {
    temperature: check(() =>
      numberField(
        "temperature",
        "Temperature",
        "0 (greedy) or between 0.01 and 5",
        (v) => v === 0 || (v >= 0.01 && v <= 5),
      ),
    ),
    max_tokens: check(() => numberField("max-tokens", "Max tokens", "a whole number of at least 1", whole(1))),
  };
  const seed = check(seedField);
  for (const name of Object.keys(sampling)) if (sampling[name] === undefined) delete sampling[name];
  const body = { question };
  if (dataUrl && readsImages) body.images = [dataUrl];
  if (n !== undefined) body.n = n;
  if (Object.keys(sampling).length) body.sampling = sampling;
  body.reward = { mode };
  return { body, seed };
}

// The seed as its decimal digits (bodyText writes them into the JSON as they are), or undefined when empty.
function seedField() {
  const text = $("seed").value.trim();
  if (text === "") return undefined;
  if (!/^\d{1,19}$/.test(text) || BigInt(text) > MAX_SEED) {
    throw new InputError(
      `Seed must be a whole number from 0 to ${MAX_SEED} (2^63 - 1), or empty for a random one.`,
      "seed",
    );
  }
  return BigInt(text).toString(); // without leading zeros, which JSON does not allow
}

function setBusy(on) {
  busy = on;
  // aria-disabled, not disabled: a disabled button drops the keyboard focus (to <body>) while the request runs.
  $("submit").setAttribute("aria-disabled", String(on));
  const cancel = $("cancel");
  if (!on && document.activeElement === cancel) $("submit").focus(); // not to <body> as Cancel hides
  cancel.hidden = !on;
}

// Why a submit stopped waiting: the user cancelled (Cancel, Escape) or the page's time limit passed.
class Stopped extends Error {
  constructor(why) {
    super(why === "timeout" ? "timed out" : "cancelled");
    this.why = why;
  }
}

function cancel() {
  if (request) request.abort(new Stopped("cancel"));
}

// The promise, or the signal's reason once it aborts (a wait that fetch's own signal does not cover).
function abortable(promise, signal) {
  return new Promise((resolve, reject) => {
    const stop = () => reject(signal.reason);
    if (signal.aborted) {
      stop();
      return;
    }
    signal.addEventListener("abort", stop, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", stop));
  });
}

async function submit(event) {
  event.preventDefault();
  if (busy) return;
  const controller = new AbortController();
  request = controller;
  const timer = setTimeout(() => controller.abort(new Stopped("timeout")), REQUEST_LIMIT_MS);
  setBusy(true);
  clearError(); // and the marks of the last request's problems
  $("results").hidden = true;
  try {
    await send(controller.signal);
  } catch (exc) {
    if (controller.signal.aborted) stopped(controller.signal.reason);
    else {
      showError("client", `the page failed: ${exc.message}`);
      setStatus("");
    }
  } finally {
    clearTimeout(timer);
    request = null;
    setBusy(false);
  }
}

// The page stopped waiting (the connection is closed; the server may still finish the work, unseen).
function stopped(reason) {
  if (reason instanceof Stopped && reason.why === "timeout") {
    setStatus("");
    showError(
      "timeout",
      `no answer within ${REQUEST_LIMIT_MS / 1000} s, so the page stopped waiting.`,
      {
        hint:
          "The service answers 504 itself after RLAIFV_REQUEST_TIMEOUT_S (120 s by default): no answer at all " +
          "means it, or a proxy in front of it, is stuck or overloaded. Try again later, or a smaller N or max tokens.",
      },
    );
  } else {
    setStatus("Cancelled: the page stopped waiting for the answer.");
  }
}

// The request's JSON text. The seed goes in as its digits: past 2^53 a JS number would round it.
function bodyText(body, seed) {
  if (seed === undefined) return JSON.stringify(body);
  const { sampling, ...rest } = body;
  const fields = JSON.stringify(sampling || {}).slice(1, -1);
  return `${JSON.stringify(rest).slice(0, -1)},"sampling":{${fields ? `${fields},` : ""}"seed":${seed}}}`;
}

async function send(signal) {
  const headers = { "Content-Type": "application/json" };
  if (!cardApplied) {
    // What the model reads decides whether an image goes with the question: the card first, if it can be had
    // (the fetch gives up after CARD_LIMIT_MS; then the page sends with what it knows).
    setStatus("Loading the model card…");
    await abortable(cardFetch || loadModel(), signal);
  }
  setStatus("Reading the image…");
  const dataUrl = await abortable(currentImage(), signal);
  if (dataUrl && !(await abortable(recheckImage(), signal))) {
    setStatus(""); // dropped, the reason shown: the image was taken before the card and the server refuses it
    return;
  }
  const sentImage = { dataUrl: readsImages ? dataUrl : null, label: imageLabel };
  const problems = [];
  const { body, seed } = requestBody(dataUrl, problems);
  try {
    const key = readKey();
    if (key) headers.Authorization = `Bearer ${key}`;
  } catch (exc) {
    if (!(exc instanceof InputError)) throw exc;
    problems.push(exc);
  }
  if (problems.length) {
    const message = problems.length === 1 ? problems[0].message : `${problems.length} problems:`;
    showError("client", message, undefined, problems);
    setStatus("");
    return;
  }
  setStatus(
    body.n === undefined
      ? "Sampling the server's default number of candidates…"
      : `Sampling ${body.n} candidate${body.n === 1 ? "" : "s"}…`,
  );
  const started = performance.now();
  let res;
  try {
    res = await fetch("v1/best-of-n", { method: "POST", headers, body: bodyText(body, seed), signal });
  } catch (exc) {
    if (signal.aborted) throw exc;
    showError("network", `could not reach the server: ${exc.message}`);
    setStatus("");
    return;
  }
  let text;
  try {
    text = await res.text();
  } catch (exc) {
    if (signal.aborted) throw exc;
    setStatus("");
    showError("answer", `the server answered HTTP ${res.status}, but the answer broke off: ${exc.message}`);
    return;
  }
  setStatus("");
  let payload;
  try {
    payload = JSON.parse(text);
  } catch {
    payload = undefined;
  }
  const contentType = res.headers.get("Content-Type");
  if (!res.ok) {
    const err = payload && payload.error && typeof payload.error === "object" ? payload.error : {};
    const message =
      typeof err.message === "string" && err.message ? err.message : plainText(text, contentType) || res.statusText;
    const problems = answerProblems(err, message || "(no details)");
    showError(
      res.status,
      problems.length > 1 ? problemsHeading(problems.length, message) : message || "(no details)",
      { code: typeof err.code === "string" ? err.code : undefined, retryAfter: res.headers.get("Retry-After") },
      problems,
    );
    return;
  }
  if (payload === undefined) {
    const shown = plainText(text, contentType);
    showError("answer", `the server answered HTTP ${res.status}, but not with JSON: ${shown || "(an empty body)"}`);
    return;
  }
  try {
    render(payload, (performance.now() - started) / 1000, body.question, sentImage);
  } catch (exc) {
    $("results").hidden = true;
    showError("answer", `the server answered HTTP ${res.status}, but its answer cannot be shown: ${exc.message}`);
    return;
  }
  const count = payload.candidates.length;
  setStatus(`Ranked ${count} candidate${count === 1 ? "" : "s"}; chosen: sample ${payload.best_index}.`);
}

function summaryItem(list, term, value) {
  list.append(el("dt", "", term), el("dd", "", value));
}

// `question` and `sent` ({dataUrl, label}) are what the request sent: the inputs may have changed since.
function render(result, roundTrip, question, sent) {
  if (!result || !Array.isArray(result.candidates) || result.candidates.length === 0) {
    throw new Error("it lists no candidates");
  }
  const summary = $("summary");
  summary.replaceChildren();
  const info = result.reward;
  const mode = info.mode === "dpo" ? "implicit" : info.mode;
  const extra = info.claim_score ? `, ${info.claim_score}` : "";
  const t = result.timings;
  summaryItem(summary, "question", question);
  summary.lastChild.classList.add("sent-question");
  const shown = el("dd", "sent-image");
  if (sent.dataUrl) {
    const thumb = el("img", "thumb");
    thumb.src = sent.dataUrl;
    thumb.alt = "the image that was sent";
    shown.append(thumb, el("span", "", sent.label));
  } else shown.textContent = "none";
  summary.append(el("dt", "", "image"), shown);
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
  const finish = el("span", "finish muted");
  finish.append(el("span", "visually-hidden", "finish reason: "), String(c.finish_reason ?? "")); // "stop" alone says little
  head.append(finish);
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

  // Each term and its value in one group (a <div> in the <dl>) that does not wrap between them.
  const stats = el("dl", "stats");
  const stat = (term, value, className) => {
    const group = el("div", "stat");
    group.append(el("dt", "", term), el("dd", className || "", value));
    stats.append(group);
  };
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
    const text = el("td", "claim");
    text.append(el("span", "claim-text", claim.claim));
    if (claim.question) text.append(el("span", "question", `asked: ${claim.question}`));
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
  $("cancel").addEventListener("click", cancel);
  // In the question (a textarea) Enter is a new line: Ctrl+Enter (Cmd+Enter on a Mac) sends.
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && busy) {
      event.preventDefault();
      cancel();
    }
  });
  // A file dropped beside the drop zone would replace the page with the file: the browser's default is kept off
  // for files (text dragged into the question still drops as text).
  for (const type of ["dragover", "drop"]) {
    document.addEventListener(type, (event) => {
      if (event.dataTransfer && [...event.dataTransfer.types].includes("Files")) event.preventDefault();
    });
  }
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) loadImage(file, file.name, true);
  });
  $("sample").addEventListener("click", () => loadSample());
  $("no-image").addEventListener("click", chooseNoImage);
  $("api-key").addEventListener("change", loadModel);
  document.addEventListener("paste", (event) => {
    if (!readsImages) return;
    for (const item of event.clipboardData ? event.clipboardData.items : []) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        event.preventDefault();
        loadImage(item.getAsFile(), "pasted image", false);
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
    if (file) loadImage(file, file.name, false);
  });
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  loadModel();
  if (!useRestoredFile()) {
    // The sample scene once the card says the model reads images, unless another image came first.
    const seq = loadSeq;
    imageLoad = modelLoad.then(() => (readsImages && seq === loadSeq ? loadSample() : undefined));
  }
  // After Back, Chromium restores the file input (the other fields too) without a change event, and only
  // after the load event: show and send that file, not the sample, so the preview, the file input and the
  // request agree. `ready` (which the tests wait for) marks the first image settled.
  window.addEventListener("pageshow", () => {
    useRestoredFile();
    currentImage().finally(() => document.body.classList.add("ready"));
  });
}

function useRestoredFile() {
  const file = $("file").files[0];
  if (!file || file === inputFile) return false;
  loadImage(file, file.name, true);
  return true;
}

init();
