// Shows the text that MemKit's info nodes return (Cache Info's table, Cache Status's detail, the
// Preload and Release summaries) on the node itself, in a read-only box under its widgets.
//
// ComfyUI's page shows a node's "text" output only for nodes it knows (Preview as Text); these
// nodes send theirs the same way (ui "text"), and this extension displays it. The box is never
// saved with the workflow nor sent with a prompt (serialize: false), so a workflow saved after a
// run is the same file as before it.
import { app } from "../../scripts/app.js";

const NODES = new Set(["MemKitCacheInfo", "MemKitCacheStatus", "MemKitPreload", "MemKitReleaseEvicted"]);
const WIDGET = "memkit_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.className = "memkit-node-text";
    box.dataset.testid = "memkit-node-text";
    box.style.cssText = "width: 100%; height: 100%; box-sizing: border-box; resize: none; font-family: monospace;"
      + " font-size: 11px; white-space: pre; overflow: auto; background: var(--comfy-input-bg, #222);"
      + " color: var(--input-text, #ddd); border: none; border-radius: 4px; padding: 4px;";
    widget = node.addDOMWidget(WIDGET, "memkit_text", box, {
      serialize: false,
      getValue: () => box.value,
      setValue: (value) => {
        box.value = value;
      },
    });
    widget.serialize = false;
  }
  widget.element.value = text;
  const lines = text.split("\n");
  const width = Math.min(1200, Math.max(node.size[0], 40 + 6.6 * Math.max(...lines.map((l) => l.length))));
  const height = Math.min(600, Math.max(node.size[1], 60 + 15 * lines.length));
  node.setSize([width, height]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "memkit.nodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text.join("\n"));
    };
  },
});
