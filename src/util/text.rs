//! Text from outside (a vendor's answer, an admin's label) made fit to show: the one rule for
//! what a message, a page or a terminal may receive.

/// `text` without control characters, line separators or invisible and direction-changing
/// characters (which would reorder or hide what an admin reads), cut to `max` characters.
pub fn visible(text: &str, max: usize) -> String {
    text.chars().filter(|c| !hidden(*c)).take(max).collect()
}

/// True for a character that must not reach a terminal, a page or a log line as is.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
}
