// i2v page behaviour that HTML and htmx can't express: the image preview and error notices.
(function () {
  "use strict";

  // Preview the chosen image before it is uploaded. Delegated, so it survives htmx swaps of the form.
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!input.matches || !input.matches("input[type=file][data-preview]")) return;
    var preview = document.getElementById(input.dataset.preview);
    var hint = input.dataset.hint ? document.getElementById(input.dataset.hint) : null;
    var file = input.files && input.files[0];
    if (!preview) return;
    if (preview.dataset.objectUrl) URL.revokeObjectURL(preview.dataset.objectUrl);
    if (!file) {
      preview.hidden = true;
      preview.removeAttribute("src");
      return;
    }
    var url = URL.createObjectURL(file);
    preview.dataset.objectUrl = url;
    preview.src = url;
    preview.hidden = false;
    if (hint) hint.textContent = file.name + " · " + (file.size / 1e6).toFixed(1) + " MB";
  });

  // The Advanced fields' placeholders say what an empty field means: the chosen model's defaults.
  document.addEventListener("change", function (event) {
    var select = event.target;
    if (!select.matches || !select.matches("select#id_model")) return;
    var option = select.options[select.selectedIndex];
    if (!option) return;
    var form = select.form || document;
    form.querySelectorAll("[data-default]").forEach(function (input) {
      var value = option.dataset[input.dataset.default];
      if (value) input.placeholder = value;
    });
    form.querySelectorAll("[data-default-of]").forEach(function (span) {
      var value = option.dataset[span.dataset.defaultOf];
      if (value) span.textContent = value;
    });
  });

  function flash(message) {
    var box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.hidden = false;
  }

  // htmx leaves 4xx/5xx answers unswapped (except 422, a form with its errors): say what happened.
  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    var text = (xhr.responseText || "").trim();
    var plain = text && text.length < 300 && text.indexOf("<") === -1 ? text : "";
    var messages = {
      403: "You are not allowed to do that.",
      404: "Not found: it may have been deleted.",
      429: "Too many requests: wait a moment and try again.",
    };
    flash(plain || messages[xhr.status] || "The server answered with an error (HTTP " + xhr.status + "). Reload the page and try again.");
  });
  document.addEventListener("htmx:sendError", function () {
    flash("The server could not be reached. Check your connection; the page retries on its own.");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var box = document.getElementById("flash");
    if (box && !box.hidden && event.detail.successful) box.hidden = true;
  });
})();
