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
            '\u{00AD}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What would reorder, hide or rewrite what an admin reads goes; letters of any script stay.
    #[test]
    fn hidden_characters_go_and_letters_stay() {
        for c in [
            '\u{1b}',
            '\r',
            '\u{85}',
            '\u{AD}',
            '\u{61C}',
            '\u{200B}',
            '\u{202E}',
            '\u{2066}',
            '\u{3164}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{E0041}',
        ] {
            assert!(hidden(c), "{:?}", c);
        }
        assert_eq!(visible("Zoë 東京 مرحبا — ok", 100), "Zoë 東京 مرحبا — ok");
        assert_eq!(visible("ab\u{202E}cd", 3), "abc");
    }
}
