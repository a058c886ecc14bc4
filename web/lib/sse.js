// A Server-Sent Events parser for streams read with `fetch`, which (unlike EventSource) can
// send the `Authorization` header the server asks for on every read. Pure, no DOM: the unit
// tests import it directly.
//
// It follows the WHATWG rules that matter here: lines end in LF, CR or CRLF; a blank line
// dispatches the event; `data:` lines join with LF; `event:` names it (default "message");
// `id:` sets the last event id (kept across events, ignored when it holds a NUL); lines
// starting with ":" are comments (the server's keep-alive pings); one space after the colon
// is dropped.

/**
 * Make a parser. `onEvent({ type, data, lastEventId })` is called once per complete event.
 * Returns `{ push(text), lastEventId() }`: feed it decoded text in chunks of any size.
 */
export function sseParser(onEvent, { lastEventId = '' } = {}) {
  let buffer = '';
  let data = [];
  let type = '';
  let id = lastEventId;
  let sawCR = false; // a CR ended the previous chunk: an LF at the start of the next is its pair

  const line = (text) => {
    if (text === '') {
      if (data.length) onEvent({ type: type || 'message', data: data.join('\n'), lastEventId: id });
      data = [];
      type = '';
      return;
    }
    if (text.startsWith(':')) return;
    const colon = text.indexOf(':');
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? '' : text.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') type = value;
    else if (field === 'id' && !value.includes('\0')) id = value;
    // `retry` and unknown fields are ignored: reconnection timing is the caller's.
  };

  return {
    push(chunk) {
      if (sawCR && chunk.startsWith('\n')) chunk = chunk.slice(1);
      sawCR = false;
      buffer += chunk;
      let start = 0;
      for (;;) {
        const m = /\r\n|\r|\n/g;
        m.lastIndex = start;
        const hit = m.exec(buffer);
        if (!hit) break;
        // A CR at the very end may be half of a CRLF split across chunks.
        if (hit[0] === '\r' && hit.index === buffer.length - 1) sawCR = true;
        line(buffer.slice(start, hit.index));
        start = hit.index + hit[0].length;
      }
      buffer = buffer.slice(start);
    },
    lastEventId: () => id,
  };
}
