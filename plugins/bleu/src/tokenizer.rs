//! sacrebleu's default `13a` tokenizer (`Tokenizer13a` + `TokenizerRegexp`, mteval-v13a's
//! rules), and Python's notion of whitespace, which decides `split()` and `rstrip()`.
//!
//! Each of the four regexes of `TokenizerRegexp` matches a fixed class or a fixed pair of
//! classes, so `re.sub` is a left-to-right scan that skips past each match; the scans below
//! do the same over code points, as Python does over `str`.

/// `str.isspace()`: Unicode White_Space plus the ASCII separators U+001C..U+001F, which
/// Python counts and Rust's `char::is_whitespace` does not.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `line.split()`.
pub fn py_split(line: &str) -> impl Iterator<Item = &str> {
    line.split(py_isspace).filter(|t| !t.is_empty())
}

/// `line.rstrip()`.
pub fn py_rstrip(line: &str) -> &str {
    line.trim_end_matches(py_isspace)
}

/// `Tokenizer13a()(line)`: the tokenized line, tokens joined by single spaces.
pub fn tokenize_13a(line: &str) -> String {
    py_split(Tokenizer13a::default().tokenize(line))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Tokenizer13a`, reusing its buffers from line to line.
///
/// The regexes only ever match ASCII characters, so the passes run over UTF-8 bytes: a
/// non-ASCII character is a run of bytes none of which any class but `[^0-9]` matches, and a
/// pair match can neither start inside such a run nor end inside it, so the result is the
/// same as over code points. Spaces are only ever inserted between characters.
#[derive(Default)]
pub struct Tokenizer13a {
    buffer: Vec<u8>,
    spare: Vec<u8>,
}

impl Tokenizer13a {
    /// The line after `Tokenizer13a`'s substitutions, before its final `split()`/`join`:
    /// `py_split` of it gives the tokens.
    pub fn tokenize(&mut self, line: &str) -> &str {
        // The replacements are applied in sacrebleu's order; each only when it can match.
        let mut line = std::borrow::Cow::Borrowed(line);
        if line.contains("<skipped>") {
            line = line.replace("<skipped>", "").into();
        }
        if line.contains('\n') {
            line = line.replace("-\n", "").replace('\n', " ").into();
        }
        if line.contains('&') {
            // Order matters: "&amp;lt;" becomes "&lt;" and then "<", as in sacrebleu.
            line = line
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .into();
        }

        // f" {line} ", then r'([\{-\~\[-\` -\&\(-\+\:-\@\/])' -> r' \1 '
        let buffer = &mut self.buffer;
        buffer.clear();
        for &b in b" ".iter().chain(line.as_bytes()).chain(b" ") {
            if is_13a_symbol(b) {
                buffer.extend([b' ', b, b' ']);
            } else {
                buffer.push(b);
            }
        }
        let is_digit = |b: u8| b.is_ascii_digit();
        let is_period_comma = |b: u8| b == b'.' || b == b',';
        if buffer.iter().any(|&b| is_period_comma(b)) {
            // r'([^0-9])([\.,])' -> r'\1 \2 '
            sub_pairs(
                &mut self.buffer,
                &mut self.spare,
                |a| !is_digit(a),
                is_period_comma,
                |a, b, out| out.extend([a, b' ', b, b' ']),
            );
            // r'([\.,])([^0-9])' -> r' \1 \2'
            sub_pairs(
                &mut self.buffer,
                &mut self.spare,
                is_period_comma,
                |b| !is_digit(b),
                |a, b, out| out.extend([b' ', a, b' ', b]),
            );
        }
        if self.buffer.contains(&b'-') {
            // r'([0-9])(-)' -> r'\1 \2 '
            sub_pairs(
                &mut self.buffer,
                &mut self.spare,
                is_digit,
                |b| b == b'-',
                |a, b, out| out.extend([a, b' ', b, b' ']),
            );
        }
        std::str::from_utf8(&self.buffer).expect("spaces are only inserted between characters")
    }
}

/// The class `[\{-\~\[-\` -\&\(-\+\:-\@\/]`: `{|}~`, ``[\]^_` ``, space to `&`, `(` to `+`,
/// `:` to `@`, and `/`.
fn is_13a_symbol(b: u8) -> bool {
    matches!(b, b'{'..=b'~' | b'['..=b'`' | b' '..=b'&' | b'('..=b'+' | b':'..=b'@' | b'/')
}

/// `re.sub` for a two-character pattern `(first)(second)` over `text`, through `spare`: scan
/// left to right, and after a match continue behind it, so a character consumed as `second`
/// cannot start the next match.
fn sub_pairs(
    text: &mut Vec<u8>,
    spare: &mut Vec<u8>,
    first: impl Fn(u8) -> bool,
    second: impl Fn(u8) -> bool,
    replace: impl Fn(u8, u8, &mut Vec<u8>),
) {
    spare.clear();
    let mut i = 0;
    while i < text.len() {
        if i + 1 < text.len() && first(text[i]) && second(text[i + 1]) {
            replace(text[i], text[i + 1], spare);
            i += 2;
        } else {
            spare.push(text[i]);
            i += 1;
        }
    }
    std::mem::swap(text, spare);
}

#[cfg(test)]
mod tests {
    use crate::tokenizer::{py_split, tokenize_13a};

    /// The tokenizer as it was first written: each regex a pass over code points, as Python
    /// runs it. The byte-level one must agree with it on any text.
    fn reference_13a(line: &str) -> String {
        let mut line = line
            .replace("<skipped>", "")
            .replace("-\n", "")
            .replace('\n', " ");
        if line.contains('&') {
            // Order matters: "&amp;lt;" becomes "&lt;" and then "<", as in sacrebleu.
            line = line
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
                .replace("&lt;", "<")
                .replace("&gt;", ">");
        }
        let line = format!(" {line} ");

        // r'([\{-\~\[-\` -\&\(-\+\:-\@\/])' -> r' \1 '
        let mut spaced = String::with_capacity(line.len() * 2);
        for c in line.chars() {
            if is_13a_symbol_char(c) {
                spaced.push(' ');
                spaced.push(c);
                spaced.push(' ');
            } else {
                spaced.push(c);
            }
        }
        let is_digit = |c: char| c.is_ascii_digit();
        let is_period_comma = |c: char| c == '.' || c == ',';
        // r'([^0-9])([\.,])' -> r'\1 \2 '
        let s = sub_pairs(
            &spaced,
            |a| !is_digit(a),
            is_period_comma,
            |a, b, out| {
                out.extend([a, ' ', b, ' ']);
            },
        );
        // r'([\.,])([^0-9])' -> r' \1 \2'
        let s = sub_pairs(
            &s,
            is_period_comma,
            |b| !is_digit(b),
            |a, b, out| {
                out.extend([' ', a, ' ', b]);
            },
        );
        // r'([0-9])(-)' -> r'\1 \2 '
        let s = sub_pairs(
            &s,
            is_digit,
            |b| b == '-',
            |a, b, out| {
                out.extend([a, ' ', b, ' ']);
            },
        );
        py_split(&s).collect::<Vec<_>>().join(" ")
    }

    fn is_13a_symbol_char(c: char) -> bool {
        matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
    }

    /// `re.sub` for a two-character pattern `(first)(second)`: scan left to right, and after a
    /// match continue behind it, so a character consumed as `second` cannot start the next match.
    fn sub_pairs(
        text: &str,
        first: impl Fn(char) -> bool,
        second: impl Fn(char) -> bool,
        replace: impl Fn(char, char, &mut String),
    ) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len() + text.len() / 2);
        let mut i = 0;
        while i < chars.len() {
            if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
                replace(chars[i], chars[i + 1], &mut out);
                i += 2;
            } else {
                out.push(chars[i]);
                i += 1;
            }
        }
        out
    }

    fn check(line: &str, expect: &str) {
        assert_eq!(tokenize_13a(line), expect, "tokenize_13a({line:?})");
        assert_eq!(reference_13a(line), expect, "reference_13a({line:?})");
    }

    #[test]
    fn bytes_and_code_points_agree() {
        // Pieces every rule reacts to, other ASCII, Python-only whitespace, multi-byte text.
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "0",
            "7",
            ".",
            ",",
            "-",
            "'",
            "\"",
            "$",
            "(",
            ")",
            "/",
            "@",
            "~",
            " ",
            "  ",
            "\n",
            "-\n",
            "\t",
            "\u{1c}",
            "\u{a0}",
            "\u{2028}",
            "é",
            "😀",
            "\u{0}",
            "&",
            ";",
            "&amp;",
            "&quot;",
            "&lt;",
            "&gt;",
            "&amp;lt;",
            "<skipped>",
            "<",
            ">",
            "word",
            "3.50",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = next() % 24;
            let line: String = (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            assert_eq!(tokenize_13a(&line), reference_13a(&line), "{line:?}");
        }
    }

    #[test]
    fn mteval_rules() {
        check("Hello, world!", "Hello , world !");
        check("It costs $3.50, not 3,5.", "It costs $ 3.50 , not 3,5 .");
        check("1990-2000 e-mail", "1990 - 2000 e-mail");
        check("Tom &amp; Jerry &quot;hi&quot;", "Tom & Jerry \" hi \"");
        check("don't", "don't");
        check("a..b", "a . . b");
        check("<skipped>x", "x");
        check("", "");
    }
}
