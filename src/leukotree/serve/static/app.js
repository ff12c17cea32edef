// leukotree serve: uploads with progress, live case status, keyboard review.
// Everything goes through the JSON API; user text is inserted with textContent only.
"use strict";

function $(id) { return document.getElementById(id); }
function json(id) { const el = $(id); return el ? JSON.parse(el.textContent) : null; }

async function api(method, url, body) {
  const response = await fetch(url, {method, headers: {"Content-Type": "application/json"},
                                     body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) { throw new Error(data.error || ("HTTP " + response.status)); }
  return data;
}

// ----------------------------------------------------------------- new case
function setupUpload() {
  const form = $("upload-form");
  if (!form) { return; }
  let dropped = [];
  const zone = $("dropzone");
  const chosen = () => {
    const n = dropped.length + $("files").files.length + $("folder").files.length;
    $("chosen").textContent = n ? n + " file(s) chosen" : "";
  };
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    dropped = dropped.concat(Array.from(e.dataTransfer.files)); chosen();
  });
  $("files").addEventListener("change", chosen);
  $("folder").addEventListener("change", chosen);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData();
    data.append("patient", $("patient").value);
    data.append("model", $("model").value);
    const all = dropped.concat(Array.from($("files").files), Array.from($("folder").files));
    if (!all.length) { $("status").textContent = "Choose the cells first."; return; }
    all.forEach((f) => data.append("files", f, f.webkitRelativePath || f.name));
    const bar = $("progress");
    bar.hidden = false;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/cases");
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) { bar.max = ev.total; bar.value = ev.loaded; }
      $("status").textContent = "Uploading…";
    };
    xhr.onload = () => {
      const reply = JSON.parse(xhr.responseText || "{}");
      if (xhr.status !== 201) { $("status").textContent = reply.error || "Upload failed"; return; }
      watchCase(reply.id, true);
    };
    // a refusal before the whole body is sent (a limit) may reach the page as a network error
    xhr.onerror = () => { $("status").textContent = "Upload refused or interrupted: check the limits (files, bytes) and try again."; };
    xhr.send(data);
  });
}

function watchCase(id, redirect) {
  const tick = async () => {
    const c = await api("GET", "/api/cases/" + id);
    const bar = $("progress");
    if (bar) { bar.max = c.n_cells; bar.value = c.done_cells; }
    const status = $("status") || $("case-status");
    if (status) { status.textContent = c.status + " (" + c.done_cells + "/" + c.n_cells + ")"; }
    if (c.status === "done" || c.status === "failed") {
      window.location = "/cases/" + id;
      return;
    }
    setTimeout(tick, 500);
  };
  tick();
}

// ----------------------------------------------------------------- case page
function setupCase() {
  const kase = json("case-data");
  if (!kase) { return; }
  if (kase.status !== "done" && kase.status !== "failed") { watchCase(kase.id, false); return; }
  if (kase.status !== "done") { return; }
  const leaves = json("leaves"), paths = json("paths");
  const reviewer = $("reviewer");
  reviewer.value = localStorage.getItem("leukotree-reviewer") || "";
  reviewer.addEventListener("change", () => localStorage.setItem("leukotree-reviewer", reviewer.value));
  const cells = kase.cells.filter((c) => !c.error);
  let order = [], selected = -1;
  const cards = new Map();

  const confidence = (c) => Math.max(...leaves.map((l) => c.probabilities[l] || 0));
  const evidence = (c) => (kase.diagnosis.label ? c.probabilities[kase.diagnosis.label] || 0 : 0);
  // a cell-type model's cells grouped by class: unclassifiable cells last
  const group = (c) => (c.unclassifiable && !c.reviewed_label ? "unclassifiable" : c.label);
  const rank = (c) => (group(c) === "unclassifiable" ? leaves.length : leaves.indexOf(group(c)));
  function draw() {
    const how = $("sort").value;
    const size = (c) => (c.answer_leaves ? c.answer_leaves.length : 1);
    order = cells.slice().sort((a, b) => how === "uncertainty" ? confidence(a) - confidence(b)
      : how === "answer" ? size(b) - size(a) || confidence(a) - confidence(b)
      : how === "evidence" ? evidence(b) - evidence(a)
      : how === "class" ? (rank(a) - rank(b)) || (confidence(a) - confidence(b)) : a.index - b.index);
    const gallery = $("gallery");
    gallery.textContent = "";
    order.forEach((c, k) => {
      if (how === "class" && (k === 0 || group(order[k - 1]) !== group(c))) {
        const heading = document.createElement("h3");
        heading.className = "group";
        heading.textContent = group(c) + " (" + order.filter((o) => group(o) === group(c)).length + ")";
        gallery.append(heading);
      }
      const card = document.createElement("div");
      card.className = "cellcard" + (c.reviewed_label ? " reviewed" : "");
      card.dataset.index = c.index;
      const img = document.createElement("img");
      img.src = "/cases/" + kase.id + "/cells/" + c.index + "/image";
      img.alt = c.name;
      const text = document.createElement("div");
      const named = c.answer && c.answer_node !== c.label ? c.answer : c.label;
      const shown = c.unclassifiable ? "unclassifiable (" + c.label + ")" : named;
      text.textContent = (c.reviewed_label ? "✔ " + c.reviewed_label : shown) + " " +
        confidence(c).toFixed(2) + (c.cell_type ? " · " + c.cell_type : "");
      if (c.referred) { text.className = "referred"; }
      card.append(img, text);
      card.addEventListener("click", () => select(k));
      cards.set(c.index, card);
      gallery.append(card);
    });
  }
  function select(k) {
    if (!order.length) { return; }
    selected = Math.max(0, Math.min(order.length - 1, k));
    const c = order[selected];
    cards.forEach((card) => card.classList.remove("selected"));
    cards.get(c.index).classList.add("selected");
    $("panel").hidden = false;
    $("panel-name").textContent = c.name;
    $("panel-label").textContent = "model: " + c.label +
      (c.answer && c.answer_node !== c.label ? " · answer: " + c.answer : "") +
      (c.reviewed_label ? " · reviewed: " + c.reviewed_label : "");
    const maps = $("heatmaps");
    maps.textContent = "";
    (paths[c.label] || []).forEach((node) => {
      const img = document.createElement("img");
      img.src = "/cases/" + kase.id + "/cells/" + c.index + "/heatmap/" + encodeURIComponent(node);
      img.alt = "heat map " + node;
      img.title = node;
      img.className = "heatmap";
      maps.append(img);
    });
  }
  async function review(body) {
    if (selected < 0) { return; }
    const c = order[selected];
    body.reviewer = reviewer.value.trim();
    try {
      const r = await api("POST", "/api/cases/" + kase.id + "/cells/" + c.index + "/review", body);
      if (r.label) { c.reviewed_label = r.label; }
      if (r.cell_type) { c.reviewed_cell_type = r.cell_type; }
      cards.get(c.index).classList.add("reviewed");
      cards.get(c.index).lastChild.textContent = "✔ " + (c.reviewed_label || c.label);
      $("review-msg").textContent = "saved";
      select(selected + 1);
    } catch (err) { $("review-msg").textContent = err.message; }
  }
  $("keys").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) { return; }
    review({label: b.dataset.accept ? order[selected].label : b.dataset.label});
  });
  const typeSelect = $("cell-type");
  if (typeSelect) { typeSelect.addEventListener("change", () => typeSelect.value && review({cell_type: typeSelect.value})); }
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") { return; }
    if (e.key === "ArrowRight") { select(selected + 1); }
    else if (e.key === "ArrowLeft") { select(selected - 1); }
    else if (e.key === "a" || e.key === "A") { review({label: order[selected].label}); }
    else if (/^[1-9]$/.test(e.key) && Number(e.key) <= leaves.length) { review({label: leaves[Number(e.key) - 1]}); }
  });
  $("sort").addEventListener("change", draw);
  $("signout").addEventListener("click", async () => {
    try {
      const r = await api("POST", "/api/cases/" + kase.id + "/signout",
                          {label: $("final-label").value, reviewer: reviewer.value.trim()});
      $("signout-msg").textContent = "Signed out as " + r.final_label + ".";
    } catch (err) { $("signout-msg").textContent = err.message; }
  });
  draw();
}

// ----------------------------------------------------------------- models page (the lab loop)
function setupModels() {
  const train = $("train");
  if (!train) { return; }
  const reviewer = $("lab-reviewer");
  reviewer.value = localStorage.getItem("leukotree-reviewer") || "";
  reviewer.addEventListener("change", () => localStorage.setItem("leukotree-reviewer", reviewer.value));
  const say = (text) => { $("lab-msg").textContent = text; };
  train.addEventListener("click", async () => {
    try {
      const r = await api("POST", "/api/models/train");
      say("Training job " + r.job + " started.");
      watchJob(r.job);
    } catch (err) { say(err.message); }
  });
  document.querySelectorAll("button.promote").forEach((b) => b.addEventListener("click", async () => {
    const force = b.dataset.force === "1";
    const url = "/api/models/" + b.dataset.version + "/promote" + (force ? "?force=true" : "");
    say(force ? "Promoting (forced)…" : "Checking the gate and promoting…");
    try {
      await api("POST", url, force ? {reviewer: reviewer.value.trim()} : undefined);
      window.location.reload();
    } catch (err) { say(err.message); }
  }));
  const job = $("job");
  if (job && (job.dataset.status === "queued" || job.dataset.status === "running")) {
    watchJob(job.dataset.job);
  }
}

function watchJob(id) {
  const tick = async () => {
    const j = await api("GET", "/api/jobs/" + id);
    const status = $("job-status"), epochs = $("job-epochs"), bar = $("job-progress");
    if (status) { status.textContent = j.status; }
    if (epochs) { epochs.textContent = j.progress.epochs_done; }
    if (bar) { bar.max = j.progress.epochs; bar.value = j.progress.epochs_done; }
    if (!status) { $("lab-msg").textContent = "Training job " + id + ": " + j.status + ", epoch " + j.progress.epochs_done + " of " + j.progress.epochs; }
    if (j.status === "done" || j.status === "failed") { window.location.reload(); return; }
    setTimeout(tick, 1000);
  };
  tick();
}

function setupRerun() {
  const button = $("rerun");
  const kase = json("case-data");
  if (!button || !kase) { return; }
  button.addEventListener("click", async () => {
    try {
      await api("POST", "/api/cases/" + kase.id + "/rerun");
      watchCase(kase.id, true);
    } catch (err) { $("rerun-msg").textContent = err.message; }
  });
}

// ----------------------------------------------------------------- review queue
function setupQueue() {
  const table = $("queue");
  if (!table) { return; }
  const reviewer = $("reviewer");
  reviewer.value = localStorage.getItem("leukotree-reviewer") || "";
  reviewer.addEventListener("change", () => localStorage.setItem("leukotree-reviewer", reviewer.value));
  table.querySelectorAll(".queue-item").forEach((row) => {
    row.querySelector(".queue-save").addEventListener("click", async () => {
      const body = {reviewer: reviewer.value.trim(), label: row.querySelector(".queue-label").value};
      const type = row.querySelector(".queue-cell-type");
      if (type && type.value) { body.cell_type = type.value; }
      const msg = row.querySelector(".queue-msg");
      try {
        await api("POST", "/api/cases/" + row.dataset.case + "/cells/" + row.dataset.index + "/review", body);
        msg.textContent = "saved";
        row.classList.add("reviewed");
      } catch (err) { msg.textContent = err.message; }
    });
  });
}

setupUpload();
setupCase();
setupModels();
setupRerun();
setupQueue();
