//! Just enough telnet (RFC 854) to use a serial server's telnet port, as
//! ser2net's `telnet` accepter serves: strip commands from what arrives,
//! answer option offers, escape 0xFF in what is sent. Binary mode and
//! suppress-go-ahead are accepted, so the line stays 8-bit clean; every
//! other option is refused.

/// Interpret As Command.
const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;
/// Options we accept: binary transmission and suppress go-ahead.
const ACCEPTED: [u8; 2] = [0, 3];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Iac,
    Option(u8),
    Sub,
    SubIac,
}

/// The receiving side of a telnet connection.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { state: State::Data }
    }
}

impl Decoder {
    /// Splits `input` into console bytes (appended to `data`) and the
    /// negotiation replies to send back (appended to `reply`).
    pub fn feed(&mut self, input: &[u8], data: &mut Vec<u8>, reply: &mut Vec<u8>) {
        for &b in input {
            self.state = match (self.state, b) {
                (State::Data, IAC) => State::Iac,
                (State::Data, _) => {
                    data.push(b);
                    State::Data
                }
                (State::Iac, IAC) => {
                    data.push(IAC);
                    State::Data
                }
                (State::Iac, WILL | WONT | DO | DONT) => State::Option(b),
                (State::Iac, SB) => State::Sub,
                (State::Iac, _) => State::Data, // NOP, GA, ...: nothing to do
                (State::Option(cmd), opt) => {
                    let ok = ACCEPTED.contains(&opt);
                    match cmd {
                        WILL => reply.extend_from_slice(&[IAC, if ok { DO } else { DONT }, opt]),
                        DO => reply.extend_from_slice(&[IAC, if ok { WILL } else { WONT }, opt]),
                        _ => {} // WONT/DONT need no answer
                    }
                    State::Data
                }
                (State::Sub, IAC) => State::SubIac,
                (State::Sub, _) => State::Sub,
                (State::SubIac, SE) => State::Data,
                (State::SubIac, _) => State::Sub,
            };
        }
    }
}

/// Escapes bytes for sending: 0xFF is doubled.
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_commands_and_answers_offers() {
        let mut d = Decoder::default();
        let (mut data, mut reply) = (Vec::new(), Vec::new());
        // WILL ECHO, WILL BINARY, DO SGA, DO TERMINAL-TYPE, a subnegotiation, an escaped 0xFF.
        let input = [
            &[IAC, WILL, 1][..],
            b"he",
            &[IAC, WILL, 0, IAC, DO, 3, IAC, DO, 24],
            b"llo",
            &[IAC, SB, 44, 1, 2, IAC, IAC, 3, IAC, SE],
            &[b'!', IAC, IAC, b'\n'],
        ]
        .concat();
        // Fed in two pieces, split inside a command.
        d.feed(&input[..4], &mut data, &mut reply);
        d.feed(&input[4..], &mut data, &mut reply);
        assert_eq!(data, b"hello!\xff\n");
        assert_eq!(
            reply,
            [IAC, DONT, 1, IAC, DO, 0, IAC, WILL, 3, IAC, WONT, 24]
        );
    }

    #[test]
    fn escapes_iac() {
        assert_eq!(escape(b"a\xffb"), b"a\xff\xffb");
    }
}
