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
        if is_13a_symbol(c) {
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

/// The class `[\{-\~\[-\` -\&\(-\+\:-\@\/]`: `{|}~`, ``[\]^_` ``, space to `&`, `(` to `+`,
/// `:` to `@`, and `/`.
fn is_13a_symbol(c: char) -> bool {
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

#[cfg(test)]
mod tests {
    use crate::tokenizer::tokenize_13a;

    fn check(line: &str, expect: &str) {
        assert_eq!(tokenize_13a(line), expect, "tokenize_13a({line:?})");
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
