/* collective.streamguard: follow a log with EventSource.
 *
 * Every byte of the log, and everything else the server says, goes into the
 * page through textContent, never as HTML: a log line holding <script>
 * shows as text.  EventSource reconnects by itself and sends Last-Event-ID,
 * the id of the last event it got (the file and the byte offset after it),
 * so a reconnection to the same file neither loses nor repeats anything;
 * the server tells it when (a jittered retry: field).  Every stream first
 * names the instance serving it (event "stream"), shown next to the log's
 * name.  A reconnection that lands where that file is not followed (another
 * instance behind a balancer, a rotated log) gets event "switch" instead:
 * the viewer draws a divider naming the instance and the log, and the
 * lines after it are that file's, from where the server says.  Where EventSource gives up (the
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
  var instanceLabel = document.getElementById("streamguard-instance");
  var source = null;
  var partial = null; // the last line's element while it has no newline yet
  var resume = null; // {name, id}: the last event id of the log followed
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

  function showSize(id) {
    // An id is "<file>-<offset>", perhaps followed by places in other
    // files (".<file>-<offset>"), or a bare offset: show the offset.
    var offset = /^(?:[0-9a-f]+-)?([0-9]+)(?:\.|$)/.exec(id || "");
    if (offset !== null) {
      sizeLabel.textContent = "(" + offset[1] + " bytes read)";
    }
  }

  function about(event) {
    // What the server says of the stream: {instance, log[, reason, lines]}.
    try {
      var parsed = JSON.parse(event.data);
      return parsed !== null && typeof parsed === "object" ? parsed : {};
    } catch (error) {
      return {};
    }
  }

  function showInstance(stream) {
    var instance = typeof stream.instance === "string" ? stream.instance : "";
    instanceLabel.textContent = instance ? "on " + instance : "";
    root.setAttribute("data-instance", instance);
  }

  function divider(stream) {
    // A line of the old file that had no newline yet is not continued by
    // the new file's text.
    partial = null;
    var element = document.createElement("div");
    element.className = "streamguard-divider";
    element.setAttribute("role", "separator");
    var start = "new lines follow.";
    if (stream.start === "resumed") {
      start = "it goes on where this viewer left it.";
    } else if (typeof stream.lines === "number" && stream.lines > 0) {
      start = "its last " + stream.lines + " lines follow.";
    }
    element.textContent =
      "Switched to log " +
      String(stream.log) +
      " on " +
      String(stream.instance) +
      " (" +
      String(stream.reason) +
      "): " +
      start;
    output.appendChild(element);
  }

  function remember(event) {
    if (event.lastEventId) {
      resume.id = event.lastEventId;
      showSize(event.lastEventId);
    }
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
    // lines= also says where a resumed stream starts if it switches.
    query += "&lines=" + (parseInt(linesInput.value, 10) || 0);
    if (resume !== null && resume.name === name && resume.id !== null) {
      query += "&resume=" + encodeURIComponent(resume.id);
    } else {
      output.textContent = "";
      partial = null;
      resume = { name: name, id: null };
    }
    nameLabel.textContent = name;
    showInstance({});
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
      remember(event);
    };
    source.addEventListener("stream", function (event) {
      showInstance(about(event));
      remember(event);
    });
    source.addEventListener("switch", function (event) {
      var stream = about(event);
      showInstance(stream);
      divider(stream);
      remember(event);
    });
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
    var lines = output.getElementsByClassName("streamguard-line");
    for (var i = 0; i < lines.length; i++) {
      filterLine(lines[i]);
    }
  });
  window.addEventListener("pagehide", stop);
  if (select.value) {
    follow();
  }
})();
