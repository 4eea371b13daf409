/* collective.streamguard: follow a log with EventSource.
 *
 * Every byte of the log goes into the page through textContent, never as
 * HTML: a log line holding <script> shows as text.  EventSource reconnects
 * by itself and sends Last-Event-ID, the byte offset after the last event it
 * got, so a reconnection neither loses nor repeats anything; the server
 * tells it when (a jittered retry: field).  Where EventSource gives up (the
 * server answered 503 or 429, as while an instance restarts), the viewer
 * tries again itself after a random delay that doubles at every failure:
 * a restart does not bring every viewer back in the same second.
 */
(function () {
  "use strict";
  var root = document.getElementById("streamguard-viewer");
  if (!root) {
    return;
  }
  var MAX_LINES = 5000;
  var url = root.getAttribute("data-stream-url");
  var select = document.getElementById("streamguard-log");
  var linesInput = document.getElementById("streamguard-lines");
  var followButton = document.getElementById("streamguard-follow");
  var pauseButton = document.getElementById("streamguard-pause");
  var filterInput = document.getElementById("streamguard-filter");
  var output = document.getElementById("streamguard-output");
  var nameLabel = document.getElementById("streamguard-name");
  var sizeLabel = document.getElementById("streamguard-size");
  var stateLabel = document.getElementById("streamguard-state");
  var source = null;
  var partial = null; // the last line's element while it has no newline yet
  var resume = null; // {name, offset} after a pause
  var retryTimer = null;
  var failures = 0; // connections that failed in a row

  function setState(text) {
    stateLabel.textContent = text;
    root.setAttribute("data-state", text);
  }

  function level(text) {
    if (/\b(ERROR|CRITICAL|FATAL)\b/.test(text)) {
      return "error";
    }
    if (/\bWARN(ING)?\b/.test(text)) {
      return "warning";
    }
    return "";
  }

  function filterLine(element) {
    var wanted = filterInput.value.toLowerCase();
    element.hidden = wanted !== "" && element.textContent.toLowerCase().indexOf(wanted) < 0;
  }

  function append(text) {
    var nearBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 20;
    var parts = text.split("\n");
    for (var i = 0; i < parts.length; i++) {
      var last = i === parts.length - 1;
      if (last && parts[i] === "") {
        partial = null; // the text ended with a newline
        break;
      }
      var element = partial;
      if (element === null) {
        element = document.createElement("div");
        element.className = "streamguard-line";
        output.appendChild(element);
      }
      element.textContent += parts[i];
      element.setAttribute("data-level", level(element.textContent));
      filterLine(element);
      partial = last ? element : null;
    }
    while (output.childElementCount > MAX_LINES) {
      output.removeChild(output.firstElementChild);
    }
    if (nearBottom) {
      output.scrollTop = output.scrollHeight;
    }
  }

  function showSize(offset) {
    sizeLabel.textContent = offset === null ? "" : "(" + offset + " bytes read)";
  }

  function retryLater() {
    // 2 to 6 s, then twice as long at every failure, at most a minute.
    var delay = Math.min(60, (2 + 4 * Math.random()) * Math.pow(2, failures));
    failures += 1;
    setState("Reconnecting in " + Math.round(delay) + " s…");
    retryTimer = window.setTimeout(function () {
      retryTimer = null;
      follow();
    }, delay * 1000);
  }

  function stop() {
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
    }
    if (source !== null) {
      source.close();
      source = null;
    }
    followButton.disabled = false;
    pauseButton.disabled = true;
  }

  function follow() {
    stop();
    var name = select.value;
    if (!name) {
      return;
    }
    var query = "format=sse&log=" + encodeURIComponent(name);
    if (resume !== null && resume.name === name && resume.offset !== null) {
      query += "&offset=" + encodeURIComponent(resume.offset);
    } else {
      output.textContent = "";
      partial = null;
      query += "&lines=" + (parseInt(linesInput.value, 10) || 0);
    }
    resume = { name: name, offset: null };
    nameLabel.textContent = name;
    var size = select.options[select.selectedIndex].getAttribute("data-size");
    sizeLabel.textContent = size ? "(" + size + " bytes)" : "";
    setState("Connecting…");
    source = new EventSource(url + "?" + query);
    source.onopen = function () {
      failures = 0;
      setState("Following.");
    };
    source.onmessage = function (event) {
      append(event.data);
      resume.offset = event.lastEventId;
      showSize(event.lastEventId);
    };
    source.addEventListener("end", function () {
      stop();
      resume = null;
      setState("The log ended.");
    });
    source.onerror = function (event) {
      if (event.data !== undefined) {
        // An "error" event the server sent: the log cannot be read any
        // more, or the stream failed.  Not a connection to try again.
        stop();
        setState("Disconnected.");
      } else if (source !== null && source.readyState === EventSource.CONNECTING) {
        setState("Reconnecting…");
      } else if (failures < 8) {
        stop();
        retryLater();
      } else {
        stop();
        setState("Disconnected.");
      }
    };
    followButton.disabled = true;
    pauseButton.disabled = false;
  }

  followButton.addEventListener("click", follow);
  pauseButton.addEventListener("click", function () {
    stop();
    setState("Paused.");
  });
  select.addEventListener("change", function () {
    resume = null;
    if (source !== null) {
      follow();
    }
  });
  filterInput.addEventListener("input", function () {
    var lines = output.children;
    for (var i = 0; i < lines.length; i++) {
      filterLine(lines[i]);
    }
  });
  window.addEventListener("pagehide", stop);
  if (select.value) {
    follow();
  }
})();
