// ldm serve's page: the form posts a job to /ldm/v1/jobs, follows it to the end, and shows its images.
// Plain JavaScript, no build step and nothing fetched from elsewhere, so the page works offline.
"use strict";

const FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "seed", "num"];
const $ = (id) => document.getElementById(id);
const POLL_MS = 250;

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(describeError(response.status, data));
  return data;
}

function describeError(status, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg).join("; ");
  return `${status}: ${detail || "request failed"}`;
}

// ---------------------------------------------------------------- the form
function readForm() {
  const request = { prompt: $("prompt").value.trim(), num: Number($("num").value || 1) };
  const negative = $("negative_prompt").value.trim();
  if (negative) request.negative_prompt = negative;
  for (const key of ["width", "height", "steps"]) if ($(key).value) request[key] = Number($(key).value);
  if ($("guidance").value) request.guidance = Number($("guidance").value);
  if ($("seed").value && Number($("seed").value) >= 0) request.seed = Number($("seed").value);
  request.sampler = $("sampler").value;
  return request;
}

function fillForm(settings) {
  for (const key of FIELDS) {
    if (key === "num" || settings[key] === undefined || settings[key] === null) continue;
    const element = $(key);
    if (key === "sampler" && ![...element.options].some((o) => o.value === settings.sampler)) continue;
    element.value = settings[key];
  }
}

function describe(settings, seed) {
  const label = SAMPLER_LABELS[settings.sampler] || settings.sampler;
  return `seed ${seed} · ${settings.steps} steps · ${label} · CFG ${settings.guidance} · ` +
    `${settings.width}×${settings.height}`;
}

// ---------------------------------------------------------------- generating
async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  button.disabled = true;
  setStatus("queued…");
  try {
    const { id } = await api("POST", "/ldm/v1/jobs", readForm());
    const job = await follow(id);
    if (job.status === "done") {
      showImages(job);
      setStatus(`done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}`);
    } else {
      setStatus(`${job.status}${job.error && job.error !== "cancelled" ? ": " + job.error : ""}`, true);
    }
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
    $("bar").hidden = true;
    $("preview").hidden = true;
    refreshQueue();
  }
}

async function follow(id) {
  for (;;) {
    const job = await api("GET", `/ldm/v1/jobs/${id}`);
    if (["done", "failed", "cancelled"].includes(job.status)) return job;
    const bar = $("bar");
    bar.hidden = false;
    if (job.progress) {
      bar.value = job.progress.fraction;
      setStatus(`step ${job.progress.step}/${job.progress.steps}` +
        (job.progress.iterations > 1 ? `, pass ${job.progress.iteration + 1}/${job.progress.iterations}` : ""));
      await showPreview(id);
    } else {
      setStatus(job.status + "…");
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// The running step's estimate of the image (TAESD or a cheap linear map of the latents, rendered by the worker
// when asked: each poll asks for the next one).
async function showPreview(id) {
  const progress = await api("GET", "/sdapi/v1/progress").catch(() => null);
  const preview = $("preview");
  if (progress && progress.state.job === id && progress.current_image) {
    preview.src = `data:image/png;base64,${progress.current_image}`;
    preview.hidden = false;
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function showImages(job) {
  const figures = document.createDocumentFragment();
  job.images.forEach((url, i) => {
    const settings = { ...job.settings, seed: job.seeds[i] };
    const figure = document.createElement("figure");
    figure.className = "result";
    const image = document.createElement("img");
    image.src = url;
    image.alt = settings.prompt;
    const caption = document.createElement("figcaption");
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = settings.prompt;
    const facts = document.createElement("div");
    facts.className = "settings";
    facts.textContent = describe(settings, settings.seed);
    const actions = document.createElement("div");
    actions.className = "actions";
    const link = document.createElement("a");
    link.href = url;
    link.download = `ldm-${job.id}-${i}.png`;
    link.textContent = "PNG";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "small reuse";
    reuse.textContent = "reuse";
    reuse.addEventListener("click", () => { fillForm(settings); setStatus("settings restored from the image"); });
    actions.append(link, reuse);
    caption.append(prompt, facts, actions);
    figure.append(image, caption);
    figures.append(figure);
  });
  $("results").prepend(figures);  // newest job first, its images in seed order
}

// ---------------------------------------------------------------- the queue
async function refreshQueue() {
  let jobs;
  try {
    jobs = (await api("GET", "/ldm/v1/jobs?limit=50")).jobs.filter((j) => ["queued", "running"].includes(j.status));
  } catch (error) {
    return;
  }
  const list = $("queue");
  list.replaceChildren();
  if (!jobs.length) {
    const empty = document.createElement("li");
    empty.className = "muted";
    empty.textContent = "empty";
    list.append(empty);
  }
  for (const job of jobs) {
    const item = document.createElement("li");
    item.textContent = `${job.status}: “${job.settings.prompt}” (${job.count} image${job.count === 1 ? "" : "s"}) `;
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small cancel";
    cancel.textContent = "cancel";
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      await api("DELETE", `/ldm/v1/jobs/${job.id}`).catch(() => {});
      refreshQueue();
    });
    item.append(cancel);
    list.append(item);
  }
}

// ---------------------------------------------------------------- dropping a PNG restores its settings
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function restoreFrom(file) {
  try {
    const info = await api("POST", "/sdapi/v1/png-info", { image: await readAsDataURL(file) });
    if (!info.ldm) throw new Error(`${file.name} holds no generation settings`);
    fillForm(info.ldm);
    setStatus(`settings restored from ${file.name}`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

function setUpDropping() {
  const overlay = $("drop");
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; overlay.hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) restoreFrom(file);
  });
}

// ---------------------------------------------------------------- start
const SAMPLER_LABELS = {};

async function start() {
  const info = await api("GET", "/ldm/v1/info");
  $("model").textContent = `model ${info.model.title}`;
  const select = $("sampler");
  for (const { name, label } of info.samplers) {
    SAMPLER_LABELS[name] = label;
    select.append(new Option(label, name));
  }
  fillForm(info.defaults);
  $("form").addEventListener("submit", generate);
  setUpDropping();
  refreshQueue();
  setInterval(refreshQueue, 2000);
  document.body.dataset.ready = "1";
}

start().catch((error) => setStatus(error.message, true));
