// ComfyUI-TLoRA frontend extension (loaded by ComfyUI's frontend from WEB_DIRECTORY).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfyui.tlora",
});
