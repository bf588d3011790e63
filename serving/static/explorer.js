// Funnel explorer: reads GET /v1/explore/{user_id} and renders each stage; a "click" button
// posts a feedback event (POST /v1/feedback) and re-reads the funnel, so the effect of online
// feedback on the next request is visible. Plain DOM, no framework; data is only ever inserted
// as text (ids come from users), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STAGES = ["retrieval", "ranking", "reranking", "total"];
  const state = {
    user: null,            // the user on screen
    finalIds: null,        // their previous final list, to mark what is new after a click
    clicked: null,         // the item clicked last, highlighted in the history
    busy: false,
  };

  // ---------------------------------------------------------------------------- helpers
  /** el("td", {className: "num"}, "1.0", childNode) -> element; null/undefined children skipped. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const score = (value) => (value === null || value === undefined ? "—" : value.toFixed(4));
  const tags = (names) => el("span", {}, ...names.map((n) => el("span", { className: "tag" }, n)));
  const when = (seconds) =>
    new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";

  // An RFC 4122 version-4 id from the CSPRNG; crypto.randomUUID needs a secure context, and the
  // page may be opened over plain http on a LAN address.
  function uuid4() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  async function fetchJSON(url, options) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = Array.isArray(body?.detail)
        ? body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
        : "";
      throw new Error(`${body?.error || `HTTP ${response.status}`}${detail ? ` (${detail})` : ""}`);
    }
    return body;
  }

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const button of document.querySelectorAll("button")) button.disabled = busy;
    if (busy) $("funnel").dataset.state = "loading";
  }

  // ---------------------------------------------------------------------------- rendering
  function renderSummary(data) {
    $("model-version").textContent = `model ${data.model_version}`;
    $("summary-user").textContent = data.user_id;
    $("summary-path").textContent = data.known_user ? "known user" : "cold start (unknown user)";
    $("merged-count").textContent = `${data.merged.count} of ${data.merged.capacity}`;
    const degraded = $("degraded");
    degraded.replaceChildren(
      ...(data.degraded.length
        ? data.degraded.map((flag) => el("span", { className: "chip bad" }, flag))
        : [el("span", { className: "chip ok" }, "none")]),
    );
    $("timings").replaceChildren(
      ...STAGES.filter((s) => s in data.timings_ms).map((stage) =>
        el("li", { className: "chip", dataset: { testid: `timing-${stage}`, stage } },
          `${stage} `, el("b", {}, data.timings_ms[stage].toFixed(2)), " ms"),
      ),
    );
  }

  function renderHistory(data) {
    const items = data.history.map((h) =>
      el("li", {
        className: h.item_id === state.clicked ? "just-clicked" : "",
        dataset: { testid: "history-item", itemId: h.item_id },
      },
      el("span", { className: "item-id" }, h.item_id),
      tags(h.categories),
      el("time", { dateTime: new Date(h.timestamp * 1000).toISOString() }, when(h.timestamp))),
    );
    $("history").replaceChildren(
      ...(items.length ? items : [el("li", { className: "muted" }, "no history yet (cold start)")]),
    );
  }

  function renderFinal(data) {
    const previous = state.finalIds;
    const rows = data.final.map((item) => {
      const isNew = previous !== null && !previous.has(item.item_id);
      return el("tr", {
        className: isNew ? "is-new" : "",
        dataset: { testid: "final-item", itemId: item.item_id },
      },
      el("td", {}, item.rank),
      el("td", { className: "item-id" }, item.item_id),
      el("td", {}, tags(item.categories)),
      el("td", { className: "num" }, score(item.score)),
      el("td", {}, tags(item.sources)),
      el("td", {},
        el("button", {
          type: "button",
          className: "click",
          dataset: { testid: "click-button", itemId: item.item_id },
          "aria-label": `Send a click on ${item.item_id}`,
          onclick: () => sendClick(item.item_id),
        }, "click")));
    });
    // Without a ranker the pipeline scores by merge position; say so rather than show bare
    // negative numbers as if a model had produced them.
    const note = $("final-note");
    note.hidden = data.ranking.ranker !== "retrieval order";
    note.textContent = "No ranker attached: scores are minus the position in the merged candidate list.";
    $("final-body").replaceChildren(
      ...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 6, className: "muted" }, "no items"))]),
    );
  }

  function itemRow(item, finalIds, withSources) {
    return el("tr", {
      className: finalIds.has(item.item_id) ? "in-final" : "",
      dataset: { itemId: item.item_id },
    },
    el("td", {}, item.rank),
    el("td", { className: "item-id", title: item.categories.join(", ") }, item.item_id),
    el("td", { className: "num" }, score(item.score)),
    withSources ? el("td", {}, tags(item.sources)) : null);
  }

  function renderSources(data, finalIds) {
    $("sources").replaceChildren(
      ...data.sources.map((source) => {
        let body;
        if (source.error) body = el("p", { className: "empty" }, `error: ${source.error}`);
        else if (!source.items.length) body = el("p", { className: "empty" }, "no candidates for this user");
        else {
          body = el("table", { className: "items compact" },
            el("thead", {}, el("tr", {},
              el("th", { scope: "col" }, "#"), el("th", { scope: "col" }, "Item"),
              el("th", { scope: "col", className: "num" }, "Score"))),
            el("tbody", {}, ...source.items.map((item) => itemRow(item, finalIds, false))));
        }
        return el("section", {
          className: "source",
          dataset: { testid: "source", source: source.name },
          "aria-label": `Source ${source.name}`,
        },
        el("h3", {}, source.name, el("span", {}, `${source.items.length} · ${source.took_ms.toFixed(1)} ms`)),
        body);
      }),
    );
  }

  function renderRanking(data, finalIds) {
    const counts = data.merged.by_source;
    const most = Math.max(1, ...Object.values(counts));
    $("merged-by-source").replaceChildren(
      el("li", { className: "head" }, el("span", {}, "source"), el("span", {}, "candidates in the merged list"), el("span", {})),
      ...Object.entries(counts).map(([name, count]) =>
        el("li", { dataset: { source: name } },
          el("span", {}, name),
          el("span", {}, el("span", { className: "bar", style: `width:${(100 * count) / most}%` })),
          el("span", { className: "count" }, count))),
    );
    if (data.merged.error) {
      $("merged-by-source").append(el("li", { className: "head" }, `merge failed: ${data.merged.error}`));
    }
    const ranking = data.ranking;
    $("ranker-name").textContent = ranking.ranker === "retrieval order"
      ? "ranker: retrieval order (no ranker attached; candidates keep their merge order)"
      : `ranker: ${ranking.ranker}`;
    if (ranking.error) $("ranker-name").textContent += ` — failed: ${ranking.error}`;
    $("ranking-body").replaceChildren(...ranking.items.map((item) => itemRow(item, finalIds, true)));
  }

  function describeAction(action) {
    const item = action.item_id ?? action.item;
    const where = action.from === undefined
      ? ""
      : ` (${action.from >= 0 ? `#${action.from + 1}` : "—"} → ${action.to >= 0 ? `#${action.to + 1}` : "—"})`;
    return el("li", {},
      el("span", { className: "kind" }, action.kind ?? "action"), " ",
      el("span", { className: "item-id" }, item ?? ""), where,
      action.reason ? el("span", { className: "muted" }, ` — ${action.reason}`) : null);
  }

  function renderRules(data) {
    const { reranker, rules } = data.reranking;
    const degraded = data.degraded.filter((flag) => flag.startsWith("reranking"));
    let note;
    if (reranker === null) note = "no re-ranker attached: the final list is the ranked top-k minus items already seen";
    else if (degraded.length) note = `re-ranker ${reranker} degraded (${degraded.join(", ")}): fallback top-k minus seen`;
    else note = `re-ranker: ${reranker}`;
    $("reranker-name").textContent = note;
    $("rules").replaceChildren(
      ...rules.map((rule, i) => {
        const actions = Array.isArray(rule.actions) ? rule.actions : null;
        return el("li", { dataset: { testid: "rule", rule: rule.rule ?? "" } },
          el("h3", {}, `${(rule.step ?? i) + 1}. ${rule.rule ?? "rule"}`,
            el("small", { className: "muted" }, actions ? ` — ${actions.length ? `${actions.length} action(s)` : "no change"}` : "")),
          actions
            ? (actions.length ? el("ul", {}, ...actions.map(describeAction)) : null)
            : el("pre", {}, JSON.stringify(rule, null, 2)));
      }),
    );
  }

  function render(data) {
    const finalIds = new Set(data.final.map((item) => item.item_id));
    renderSummary(data);
    renderHistory(data);
    renderFinal(data);
    renderSources(data, finalIds);
    renderRanking(data, finalIds);
    renderRules(data);
    state.finalIds = finalIds;
    const funnel = $("funnel");
    funnel.hidden = false;
    funnel.dataset.state = "ready";
  }

  // ---------------------------------------------------------------------------- actions
  function currentK() {
    const k = Number.parseInt($("k-input").value, 10);
    return Number.isFinite(k) && k >= 1 ? Math.min(k, 200) : 10;
  }

  async function explore(userId, { afterClick = false } = {}) {
    if (!userId) {
      setStatus("Choose a sample user or type a user id.", true);
      return;
    }
    if (userId !== state.user) {
      state.finalIds = null;  // "new" marks compare with the same user's previous list only
      state.clicked = null;
    } else if (!afterClick) {
      state.clicked = null;
    }
    state.user = userId;
    setBusy(true);
    setStatus(`Loading the funnel of ${userId}…`);
    try {
      const k = currentK();
      const data = await fetchJSON(`/v1/explore/${encodeURIComponent(userId)}?k=${k}`);
      render(data);
      const url = new URL(window.location.href);
      url.searchParams.set("user", userId);
      window.history.replaceState(null, "", url);
      setStatus(`Funnel of ${userId}: ${data.final.length} items, ${data.timings_ms.total.toFixed(1)} ms.`);
    } catch (error) {
      setStatus(`Could not load the funnel: ${error.message}`, true);
      $("funnel").dataset.state = "error";
    } finally {
      setBusy(false);
    }
  }

  async function sendClick(itemId) {
    if (state.busy || !state.user) return;
    setBusy(true);
    const event = { event_id: uuid4(), user_id: state.user, item_id: itemId, type: "click" };
    try {
      await fetchJSON("/v1/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ events: [event] }),
      });
    } catch (error) {
      setBusy(false);
      setStatus(`Feedback refused: ${error.message}`, true);
      return;
    }
    state.clicked = itemId;
    await explore(state.user, { afterClick: true });
    setStatus(`Clicked ${itemId}; the funnel was re-read (new items are marked).`);
  }

  async function loadUsers() {
    try {
      const { user_ids: users } = await fetchJSON("/v1/explore/_users?n=20");
      $("user-select").append(...users.map((id) => el("option", { value: id }, id)));
    } catch (error) {
      setStatus(`Could not list sample users: ${error.message}`, true);
    }
  }

  function init() {
    $("user-select").addEventListener("change", (event) => {
      if (!event.target.value) return;
      $("user-input").value = event.target.value;
      explore(event.target.value);
    });
    $("user-form").addEventListener("submit", (event) => {
      event.preventDefault();
      explore($("user-input").value.trim());
    });
    loadUsers();
    const fromUrl = new URLSearchParams(window.location.search).get("user");
    if (fromUrl) {
      $("user-input").value = fromUrl;
      explore(fromUrl);
    }
  }

  init();
})();
