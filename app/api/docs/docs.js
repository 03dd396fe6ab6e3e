// Renders /openapi.json: one collapsible entry per operation, grouped by tag, with its request
// and answer schemas expanded from the document's components. No dependencies, no network
// beyond this server.
"use strict";

function resolve(schema, components, seen) {
  if (!schema || typeof schema !== "object") return schema;
  if (Array.isArray(schema)) return schema.map((s) => resolve(s, components, seen));
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    if (seen.has(name)) return { $ref: name };
    return resolve(components[name], components, new Set([...seen, name]));
  }
  const out = {};
  for (const [key, value] of Object.entries(schema)) out[key] = resolve(value, components, seen);
  return out;
}

function element(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function schemaBlock(title, schema, components) {
  const pre = element("pre", {}, JSON.stringify(resolve(schema, components, new Set()), null, 2));
  return [element("h4", {}, title), pre];
}

function render(doc) {
  const components = doc.components.schemas;
  document.getElementById("info").textContent =
    `${doc.info.title} ${doc.info.version}: ${doc.info.description}`;
  const byTag = new Map();
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const tag = op.tags[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  const main = document.getElementById("operations");
  main.replaceChildren();
  for (const [tag, ops] of byTag) {
    main.append(element("h2", {}, tag));
    for (const [path, method, op] of ops) {
      const access = op.security.length === 0 ? "no key" : op.description ? "master key" : "API key";
      const summary = element(
        "summary", {},
        element("span", { class: `method ${method}` }, method),
        element("span", { class: "path" }, path), " ", op.summary,
        element("span", { class: "access" }, access),
      );
      const body = [summary];
      const request = op.requestBody && op.requestBody.content["application/json"].schema;
      if (request) body.push(...schemaBlock("Request body", request, components));
      for (const [status, answer] of Object.entries(op.responses)) {
        if (!status.startsWith("2")) continue;
        for (const [type, content] of Object.entries(answer.content || {})) {
          const schema = content["x-event-schema"] || content.schema;
          body.push(...schemaBlock(`${status} ${type}`, schema, components));
        }
      }
      main.append(element("details", {}, ...body));
    }
  }
}

fetch("/openapi.json")
  .then((r) => r.json())
  .then(render)
  .catch((err) => {
    document.getElementById("operations").textContent = `Could not load /openapi.json: ${err}`;
  });
