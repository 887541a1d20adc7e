// Line protocol over presage's C++ API, so the Python typing simulation can drive presage.
//
// Usage: presage_shim CONFIG.xml
// Each stdin line is one command; each answer is one stdout line. Fields are separated by TAB;
// inside a field, backslash, TAB, newline, carriage return and backspace are escaped as
// \\ \t \n \r \b.
//   P <context>     predict for the text before the cursor
//                   -> OK <prefix> [<word> <completion> <probability>]... (best first)
//   L <text>        learn from text (presage's offline learning API)  -> OK
//   S <var> <value> set a configuration variable                     -> OK
//   G <var>         get a configuration variable                     -> OK <value>
// Any failure answers ERR <message> and the shim keeps serving.
#include <presage.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

class TextCallback : public PresageCallback {
public:
    std::string past;
    std::string get_past_stream() const override { return past; }
    std::string get_future_stream() const override { return std::string(); }
};

std::string escape(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (char c : s) {
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '\t': out += "\\t"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\b': out += "\\b"; break;
            default: out += c;
        }
    }
    return out;
}

std::string unescape(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '\\' || i + 1 == s.size()) {
            out += s[i];
            continue;
        }
        switch (s[++i]) {
            case 't': out += '\t'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 'b': out += '\b'; break;
            default: out += s[i];  // covers "\\\\"
        }
    }
    return out;
}

std::string number(double value) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%.6g", value);
    return buffer;
}

// The text a client appends when `word` is accepted. presage's own completion() refuses a
// word whose case differs from the prefix (a case-preserving database matches prefixes
// case-insensitively: "p" finds "Paris"); then the rest of the word after the prefix is it.
std::string completion(Presage& presage, const std::string& prefix, const std::string& word) {
    try {
        return presage.completion(word);
    } catch (PresageException&) {
        return word.size() >= prefix.size() ? word.substr(prefix.size()) : std::string();
    }
}

std::vector<std::string> split_fields(const std::string& line) {
    std::vector<std::string> fields;
    size_t start = 0;
    while (true) {
        size_t tab = line.find('\t', start);
        fields.push_back(unescape(line.substr(start, tab - start)));
        if (tab == std::string::npos) break;
        start = tab + 1;
    }
    return fields;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: presage_shim CONFIG.xml" << std::endl;
        return 2;
    }
    std::ios::sync_with_stdio(false);
    TextCallback callback;
    const std::vector<std::string> no_filter;
    Presage* presage = nullptr;
    try {
        presage = new Presage(&callback, argv[1]);
    } catch (PresageException& e) {
        std::cerr << "presage_shim: cannot start presage: " << e.what() << std::endl;
        return 1;
    }
    std::string line;
    while (std::getline(std::cin, line)) {
        std::vector<std::string> f = split_fields(line);
        std::string out = "OK";
        try {
            if (f[0] == "P" && f.size() == 2) {
                callback.past = f[1];
                // The filtered overload (empty filter: no filtering) goes through the same
                // selector as predict() and also gives each suggestion's probability.
                std::multimap<double, std::string> ranked = presage->predict(no_filter);
                const std::string prefix = presage->prefix();
                out += "\t" + escape(prefix);
                for (auto it = ranked.rbegin(); it != ranked.rend(); ++it) {
                    out += "\t" + escape(it->second) + "\t" +
                           escape(completion(*presage, prefix, it->second)) + "\t" +
                           number(it->first);
                }
            } else if (f[0] == "L" && f.size() == 2) {
                presage->learn(f[1]);
            } else if (f[0] == "S" && f.size() == 3) {
                presage->config(f[1], f[2]);
            } else if (f[0] == "G" && f.size() == 2) {
                out += "\t" + escape(presage->config(f[1]));
            } else {
                out = "ERR\tunknown command or wrong number of fields";
            }
        } catch (PresageException& e) {
            out = "ERR\t" + escape(e.what());
        } catch (std::exception& e) {
            out = "ERR\t" + escape(e.what());
        }
        std::cout << out << '\n';
        std::cout.flush();
    }
    delete presage;
    return 0;
}
